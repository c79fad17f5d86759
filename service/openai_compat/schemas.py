"""OpenAI wire formats (the subset the official client uses), with our bounds."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Text = Annotated[str, Field(max_length=32_000)]
Prompt = Annotated[str, Field(min_length=1, max_length=32_000)]  # an empty raw prompt has no token to continue


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if isinstance(p, dict))
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=4096)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # our extensions (the openai client sends them with extra_body=...)
    retrieval_k: Annotated[int, Field(ge=0, le=10)] | None = None
    use_profile: bool | None = None


class ChatCompletionIn(CommonParams):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]


class CompletionIn(CommonParams):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)]


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
