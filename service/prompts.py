"""The ONE prompt builder (OPPU style): retrieved items of the user + optional profile + the request.

Serving and training both call `build_prompt`, so a user adapter is trained on exactly the prompt
shape it is served with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class PromptItem(Protocol):
    @property
    def input(self) -> str | None: ...
    @property
    def output(self) -> str: ...
    @property
    def kind(self) -> str | None: ...


CONTINUATION_PROMPT = "Write your next item in your own style."
PROFILE_PROMPT = (
    "Below are items from one user's history. Write a short profile (3-5 sentences) of this user's "
    "preferences, interests and writing style, in the third person.\n\n{items}\n\nProfile:"
)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def format_item(item: PromptItem, limit: int) -> str:
    kind = f"[{item.kind}] " if item.kind else ""
    if item.input:
        return f"- {kind}{_clip(item.input, limit // 2)} -> {_clip(item.output, limit // 2)}"
    return f"- {kind}{_clip(item.output, limit)}"


def build_prompt(
    request: str,
    retrieved: Sequence[PromptItem] = (),
    profile: str | None = None,
    *,
    item_chars: int = 600,
    profile_chars: int = 4000,
) -> str:
    """The user turn sent to the model. Without context it is the bare request."""
    parts: list[str] = []
    if retrieved:
        lines = "\n".join(format_item(it, item_chars) for it in retrieved)
        parts.append(f"Here are some of this user's past items:\n{lines}")
    if profile and profile.strip():
        parts.append(f"This user's profile: {_clip(profile, profile_chars)}")
    if not parts:
        return request
    parts.append(f"Now answer as this user would.\n{request}")
    return "\n\n".join(parts)


def training_request(item: PromptItem) -> str:
    """The request half of a training example built from one history item."""
    return item.input if item.input else CONTINUATION_PROMPT


def build_profile_prompt(items: Sequence[PromptItem], *, item_chars: int = 300) -> str:
    return PROFILE_PROMPT.format(items="\n".join(format_item(it, item_chars) for it in items))
