"""The ONE prompt builder (OPPU style): retrieved items of the user + optional profile + the request.

Serving and training both call `build_prompt`, so a user adapter is trained on exactly the prompt
shape it is served with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def context_levels(n_retrieved: int, has_profile: bool) -> list[tuple[int, bool]]:
    """THE rule for a prompt over its token budget (serving and training): how much of the context the server
    adds it keeps, most first: (retrieved items kept, profile kept). The lowest-ranked retrieved items go first,
    then the profile; what the user asked is never dropped."""
    levels = [(kept, has_profile) for kept in range(n_retrieved, -1, -1)]
    return levels + ([(0, False)] if has_profile else [])


@dataclass(frozen=True)
class PromptParts:
    """What one prompt is built from (a training example keeps it, to be rebuilt with less context)."""

    request: str
    retrieved: tuple[PromptItem, ...] = ()
    profile: str | None = None
    item_chars: int = 600
    profile_chars: int = 4000

    def build(self, kept: int | None = None, with_profile: bool = True) -> str:
        retrieved = self.retrieved if kept is None else self.retrieved[:kept]
        profile = self.profile if with_profile else None
        return build_prompt(
            self.request, retrieved, profile, item_chars=self.item_chars, profile_chars=self.profile_chars
        )

    def levels(self) -> list[str]:
        """The prompt with less and less context (`context_levels`), the whole prompt first."""
        return [self.build(kept, p) for kept, p in context_levels(len(self.retrieved), self.profile is not None)]


def training_request(item: PromptItem) -> str:
    """The request half of a training example built from one history item."""
    return item.input if item.input else CONTINUATION_PROMPT


def build_profile_prompt(items: Sequence[PromptItem], *, item_chars: int = 300) -> str:
    return PROFILE_PROMPT.format(items="\n".join(format_item(it, item_chars) for it in items))
