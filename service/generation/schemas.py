"""Generate request/response schemas (the public contract of POST /users/{id}/generate)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 32_000
# Sampling in float32 breaks down at the extremes (logits / 1e-300 overflows to inf -> NaN probabilities; a
# top_p under ~1e-45 rounds to 0 and keeps no token) and the limits mean greedy decoding anyway.
GREEDY_BELOW_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6


def near_zero_is_greedy(temperature: float) -> float:
    return 0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature


def at_least_min_top_p(top_p: float) -> float:
    return max(top_p, MIN_TOP_P)


NearZeroIsGreedy = AfterValidator(near_zero_is_greedy)
TopPFloor = AfterValidator(at_least_min_top_p)


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=5.0), NearZeroIsGreedy] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0), TopPFloor] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    retrieval_k: Annotated[int, Field(ge=0, le=10)] = 3
    use_profile: bool = True
    use_adapter: bool = True
    stream: bool = False


class RetrievedOut(BaseModel):
    id: str
    score: float


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateOut(BaseModel):
    text: str
    retrieved: list[RetrievedOut]
    adapter_version: int | None
    usage: UsageOut
    finish_reason: str
