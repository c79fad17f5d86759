"""Generate request/response schemas (the public contract of POST /users/{id}/generate)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.generation.prepare import ChatTurn, GenerationSpec, Personalization
from service.generation.sampling import SamplingOptions
from service.tenancy import UserRef

MAX_PROMPT_CHARS = 32_000
Stop = (
    Annotated[str, Field(min_length=1, max_length=200)]
    | Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=4)]
)


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object, or json_schema {"name", "schema", "strict"?}."""

    model_config = ConfigDict(extra="forbid")
    type: Annotated[str, Field(pattern="^(text|json_object|json_schema)$")]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_only_with_its_type(self) -> ResponseFormat:
        # A schema beside another type would be dropped without a word (the text is not held to it).
        if self.json_schema is not None and self.type != "json_schema":
            raise ValueError(f"json_schema is given with type {self.type!r}: use type 'json_schema'")
        return self


MAX_CANDIDATES = 32
MAX_CANDIDATE_CHARS = 1_000


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=5.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    retrieval_k: Annotated[int, Field(ge=0, le=10)] = 3
    use_profile: bool = True
    use_adapter: bool = True
    stream: bool = False
    stop: Stop | None = None  # up to 4 strings: the text ends before the first one (finish_reason "stop")
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # each token's logprob and the top k
    response_format: ResponseFormat | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}

    def spec(self, user: UserRef) -> GenerationSpec:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationSpec(
            user=user,
            prompt=(ChatTurn("user", self.prompt),),
            personalization=Personalization(self.retrieval_k, self.use_profile, self.use_adapter),
            sampling=SamplingOptions(
                self.max_new_tokens,
                self.temperature,
                self.top_p,
                self.seed,
                stop=stop,
                logprobs=self.logprobs,
                response_format=self.response_format.model_dump() if self.response_format is not None else None,
            ),
        )


class ScoreIn(BaseModel):
    """Score fixed answers instead of generating one (e.g. ratings 0.5..5.0 for an expected-value readout)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    candidates: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_CANDIDATE_CHARS)]],
        Field(min_length=1, max_length=MAX_CANDIDATES),
    ]
    retrieval_k: Annotated[int, Field(ge=0, le=10)] = 3
    use_profile: bool = True
    use_adapter: bool = True

    def spec(self, user: UserRef) -> GenerationSpec:
        return GenerationSpec(
            user=user,
            prompt=(ChatTurn("user", self.prompt),),
            personalization=Personalization(self.retrieval_k, self.use_profile, self.use_adapter),
            sampling=SamplingOptions(),
            candidates=tuple(self.candidates),
        )


class CandidateOut(BaseModel):
    text: str
    tokens: int
    logprob: float  # total log-probability of the candidate's tokens as the answer
    mean_logprob: float  # per token
    probability: float  # exp(logprob) normalised over the candidates given


class ScoreUsage(BaseModel):
    prompt_tokens: int
    candidate_tokens: int


class RetrievedOut(BaseModel):
    id: str
    score: float


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TopLogprobOut(BaseModel):
    token: str
    logprob: float


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    top_logprobs: list[TopLogprobOut]


class GenerateOut(BaseModel):
    text: str
    retrieved: list[RetrievedOut]
    adapter_version: int | None
    usage: UsageOut
    finish_reason: str
    logprobs: list[TokenLogprobOut] | None = None  # when asked for: one per token of `text`


class ScoreOut(BaseModel):
    candidates: list[CandidateOut]
    retrieved: list[RetrievedOut]
    adapter_version: int | None
    usage: ScoreUsage
