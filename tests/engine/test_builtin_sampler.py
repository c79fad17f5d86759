"""The builtin engine's per-row token choice (service/engine/builtin/sampler.py): how min_tokens, a grammar and
logit_bias combine, and that a row whose constraints leave nothing gets its own 4xx error, never token 0."""

from __future__ import annotations

import numpy as np
import torch

from service.engine.builtin.sampler import RowDecoder, choose
from service.engine.types import SamplingParams
from service.errors import GenerationFailed

EOS, VOCAB = 2, 8


class OnlyTheseMatcher:
    """A grammar at a point where only `tokens` may follow (a complete JSON value: only the end)."""

    def __init__(self, tokens: set[int]) -> None:
        self.tokens = tokens
        self.accepted: list[int] = []

    def allowed(self, n: int) -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        mask[list(self.tokens)] = True
        return mask

    def accept(self, token: int) -> None:
        if token not in self.tokens:
            raise ValueError(f"the grammar rejected token {token}")
        self.accepted.append(token)


def decoder(grammar: OnlyTheseMatcher | None = None, **params: object) -> RowDecoder:
    sampling = SamplingParams(16, stop_token_ids=frozenset({EOS}), **params)  # type: ignore[arg-type]
    return RowDecoder(sampling, grammar=grammar)


def test_min_tokens_holds_the_stop_back_while_the_grammar_allows_more() -> None:
    row = decoder(OnlyTheseMatcher({EOS, 5}), min_tokens=3)
    logits = torch.zeros(VOCAB)
    logits[EOS] = 5.0
    assert row.pick(row.process(logits)) == 5


def test_a_complete_grammar_ends_the_row_although_min_tokens_is_not_reached() -> None:
    """Only the end may follow the JSON: min_tokens cannot hold it back (it left every logit -inf, and greedy
    argmax then chose token 0, which the grammar refused: the engine step failed for every row in it)."""
    grammar = OnlyTheseMatcher({EOS})
    row = decoder(grammar, min_tokens=10)
    (choice,) = choose([row], torch.randn(1, VOCAB))
    assert not isinstance(choice, BaseException) and choice.token_id == EOS
    row.observe(choice.token_id)
    assert grammar.accepted == [EOS]


def test_min_tokens_without_a_grammar_still_masks_the_stop() -> None:
    row = decoder(min_tokens=2)
    logits = torch.zeros(VOCAB)
    logits[EOS] = 9.0
    out = row.process(logits)
    assert out[EOS] == float("-inf") and row.pick(out) != EOS


def test_constraints_that_leave_no_token_fail_the_row_with_422() -> None:
    row = decoder(OnlyTheseMatcher(set()))  # a grammar with no way on
    (choice,) = choose([row], torch.zeros(1, VOCAB))
    assert isinstance(choice, GenerationFailed) and choice.status == 422
