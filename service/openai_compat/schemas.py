"""OpenAI wire formats (what the official client sends), with our bounds. Unknown fields are kept aside
(`model_extra`) so that the service can refuse them with 400, naming them, instead of dropping them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.generation.schemas import ResponseFormat, Stop

Text = Annotated[str, Field(max_length=32_000)]
Prompt = Annotated[str, Field(min_length=1, max_length=32_000)]  # an empty raw prompt has no token to continue
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# All messages together: refused (422) before anything is tokenized, so that 256 long messages cannot buy
# seconds of tokenizer time that the context limit would then refuse anyway.
MAX_CHAT_CHARS = 64_000


class ContentPart(BaseModel):
    """One part of a message's content list. Only text parts are served; any other `type` (image_url,
    input_audio, file, ...) and any extra field are refused by name by the service, never dropped."""

    model_config = ConfigDict(extra="allow")
    type: Annotated[str, Field(min_length=1, max_length=64)]
    text: Text | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text content part needs its `text`")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras (tool_calls, ...) are refused by name by the service
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=256)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # other part types never reach here: the service refuses them
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are refused by name by the service
    include_usage: bool = False


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    n: Annotated[int, Field(ge=1, le=8)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    response_format: ResponseFormat | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # OpenAI's end-user id: accepted, not used
    # vLLM's extensions (the openai client sends them with extra_body=...)
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0, le=4096)] | None = None
    # ours
    retrieval_k: Annotated[int, Field(ge=0, le=10)] | None = None
    use_profile: bool | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> CommonParams:
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM: not silently ignored
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionIn(CommonParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionIn:
        if self.top_logprobs is not None and not self.logprobs:  # as OpenAI and vLLM: not silently ignored
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        return self

    @model_validator(mode="after")
    def _total_chars(self) -> ChatCompletionIn:
        total = sum(len(m.text()) for m in self.messages)
        if total > MAX_CHAT_CHARS:
            raise ValueError(f"messages hold {total} characters in all; the limit is {MAX_CHAT_CHARS}")
        return self


class CompletionIn(CommonParams):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "oppu"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
