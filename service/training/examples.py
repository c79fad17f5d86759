"""One user's history -> training examples with OPPU retrieval over that user's EARLIER items only.

Pure (no SQL, no torch): prompts come from `service.prompts.build_prompt`, the same builder serving uses.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.prompts import PromptItem, PromptParts, training_request
from service.retrieval.bm25 import BM25Index, Doc


class HistoryLike(Doc, PromptItem, Protocol):
    """A history item as retrieval (id, input, output) and the prompt builder (+ kind) see it."""


@dataclass(frozen=True)
class TrainExample:
    item_id: str
    prompt: str  # the user turn, exactly as serving would build it
    target: str  # the assistant answer the loss is taken on
    # What `prompt` was built from: a prompt over the token budget is rebuilt with less context, by serving's
    # rule (`prompts.context_levels`), not cut from the left (which dropped the chat template and the best item).
    parts: PromptParts | None = field(default=None, compare=False)  # derived: equal examples, equal prompts


def retrieval_plan(
    items: Sequence[HistoryLike], *, k: int, positions: Iterable[int] | None = None
) -> dict[int, list[int]]:
    """For each position i (default: every item), the indices (all < i) of the items retrieved into its
    prompt, best first."""
    wanted = sorted(set(range(len(items)) if positions is None else positions))
    if k <= 0:
        return {i: [] for i in wanted}
    # Item i is retrieved from an index over items[:i] ONLY: later items can influence neither the retrieved
    # text nor the ranking (idf). One index grows item by item (`extended` tokenizes only the new items and
    # shares the old segments): a fresh index per item was quadratic (4,000 items took 199 s to plan).
    plan: dict[int, list[int]] = {}
    index, indexed = BM25Index.from_terms([]), 0
    for i in wanted:
        index, indexed = index.extended(items[indexed:i]), i
        plan[i] = [hit.index for hit in index.top_k(training_request(items[i]), k)]
    return plan


def _examples(
    items: Sequence[HistoryLike],
    positions: Sequence[int],
    plan: Mapping[int, Sequence[int]],
    profile: str | None,
    item_chars: int,
    profile_chars: int,
) -> list[TrainExample]:
    out: list[TrainExample] = []
    for i in positions:
        item = items[i]
        retrieved = tuple(items[j] for j in plan[i])
        parts = PromptParts(training_request(item), retrieved, profile, item_chars, profile_chars)
        out.append(TrainExample(item_id=item.id, prompt=parts.build(), target=item.output, parts=parts))
    return out


def build_user_examples(
    items: Sequence[HistoryLike],
    *,
    k: int,
    profile: str | None = None,
    item_chars: int = 600,
    profile_chars: int = 4000,
    max_examples: int | None = None,
) -> list[TrainExample]:
    """One example per item of ONE user's history (chronological order), in history order; with
    `max_examples`, for the most recent that many items only (retrieval still sees every earlier item)."""
    positions = range(0 if max_examples is None else max(0, len(items) - max_examples), len(items))
    plan = retrieval_plan(items, k=k, positions=positions)
    return _examples(items, positions, plan, profile, item_chars, profile_chars)


def build_shared_examples(
    users_items: Mapping[str, Sequence[HistoryLike]],
    *,
    k: int,
    max_per_user: int | None = None,
    seed: int = 0,
    profiles: Mapping[str, str | None] | None = None,
    item_chars: int = 600,
    profile_chars: int = 4000,
) -> list[TrainExample]:
    """Stage-1 (shared task LoRA) examples from many users, shuffled deterministically by `seed`.

    Each user's retrieval runs over that user's own earlier items only; `max_per_user` samples that many
    of a user's items (retrieval still sees all of that user's earlier items).
    """
    rng = random.Random(seed)
    out: list[TrainExample] = []
    for user in sorted(users_items):  # sorted: the result must not depend on the mapping's order
        items = users_items[user]
        positions = list(range(len(items)))
        if max_per_user is not None and len(positions) > max_per_user:
            positions = sorted(rng.sample(positions, max(0, max_per_user)))
        plan = retrieval_plan(items, k=k, positions=positions)  # the sampled items only
        profile = profiles.get(user) if profiles else None
        out.extend(_examples(items, positions, plan, profile, item_chars, profile_chars))
    rng.shuffle(out)
    return out
