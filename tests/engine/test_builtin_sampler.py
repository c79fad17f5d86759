"""The builtin engine's per-row token choice (service/engine/builtin/sampler.py): how min_tokens, a grammar and
logit_bias combine, and that a row whose constraints leave nothing gets its own 4xx error, never token 0."""

from __future__ import annotations

import numpy as np
import pytest
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


# Sampling semantics and cost shape. The cost was per row on the one engine thread: a Python loop over
# logit_bias, a sort of the whole vocabulary for top_p and multinomial over it, every step, for every row.


def sampled(logits: torch.Tensor, seed: int, steps: int = 1, **params: object) -> list[int]:
    """`steps` tokens of one seeded row from the same logits."""
    row = RowDecoder.for_params(SamplingParams(16, seed=seed, **params), torch.device("cpu"))  # type: ignore[arg-type]
    out = []
    for _ in range(steps):
        (choice,) = choose([row], logits.unsqueeze(0))
        assert not isinstance(choice, BaseException), choice
        out.append(choice.token_id)
    return out


def stable_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The reference rule: the smallest prefix of the stably sorted probabilities whose mass reaches top_p."""
    values, order = probs.sort(descending=True, stable=True)
    return set(order[(values.cumsum(0) - values) < top_p].tolist())


def test_top_p_draws_only_from_the_nucleus_and_all_of_it() -> None:
    probs = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])  # top_p 0.8: 0.4 + 0.3 reach 0.7 < 0.8, + 0.15 reaches it
    logits = probs.log()
    drawn = {t for seed in range(300) for t in sampled(logits, seed, temperature=1.0, top_p=0.8)}
    assert drawn == {1, 2, 3}


def test_top_p_keeps_the_top_token_however_small_top_p() -> None:
    logits = torch.tensor([0.0, 1.0, 0.5])
    assert {t for seed in range(50) for t in sampled(logits, seed, temperature=1.0, top_p=1e-9)} == {1}


def test_equal_probabilities_at_the_edge_of_the_nucleus_keep_the_lower_token_ids() -> None:
    """As the stable sort did: of 10 equal tokens top_p 0.25 keeps 3 (0.2 < 0.25 before the third)."""
    vocab = 4096  # past the topk, whose order of equal values is arbitrary
    logits = torch.full((vocab,), -1e4)
    ids = torch.tensor([4000, 7, 2000, 30, 1500, 900, 100, 3000, 5, 60])
    logits[ids] = 0.0
    drawn = {t for seed in range(200) for t in sampled(logits, seed, temperature=1.0, top_p=0.25)}
    assert drawn == {5, 7, 30}


def test_a_nucleus_larger_than_the_topk_is_still_exact() -> None:
    """A flat distribution: top_p 0.9 needs ~3,700 of 4,096 tokens, more than the topk looks at."""
    logits = torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 0.3
    nucleus = stable_nucleus(torch.softmax(logits, dim=-1), 0.9)
    assert 1024 < len(nucleus) < 4096
    drawn = [t for seed in range(20) for t in sampled(logits, seed, steps=100, temperature=1.0, top_p=0.9)]
    assert set(drawn) <= nucleus and len(set(drawn)) > 1000


def test_top_p_matches_the_stable_sort_rule_on_random_and_tied_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        vocab = (8, 50, 2000, 5000)[trial % 4]
        scale = float(torch.rand(1, generator=gen)) * 6
        logits = torch.randint(0, 4, (vocab,), generator=gen).float() if trial % 2 else torch.randn(vocab) * scale
        top_p = float(torch.rand(1, generator=gen)) * 0.98 + 0.01
        nucleus = stable_nucleus(torch.softmax(logits, dim=-1), top_p)
        assert set(sampled(logits, trial, steps=30, temperature=1.0, top_p=top_p)) <= nucleus


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().clamp(min=-1e4)  # the last one's probability underflows to 0: never drawn
    for top_p, target in ((1.0, probs), (0.7, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0, 0.0]))):
        drawn = torch.tensor(sampled(logits, 7, steps=4000, temperature=1.0, top_p=top_p))
        freq = torch.bincount(drawn, minlength=5).double() / 4000
        assert torch.allclose(freq, target.double(), atol=0.03), (top_p, freq)


def test_temperature_scales_the_distribution() -> None:
    logits = torch.tensor([0.0, 1.0])
    drawn = torch.tensor(sampled(logits, 1, steps=4000, temperature=0.5))
    assert abs(float(drawn.double().mean()) - float(torch.sigmoid(torch.tensor(2.0)))) < 0.03


def test_a_tiny_temperature_picks_the_top_token_without_nan() -> None:
    logits = torch.tensor([0.3, 2.0, 1.999, -5.0])
    for temperature in (1e-30, 1e-6):
        assert set(sampled(logits, 0, steps=20, temperature=temperature)) == {1}
        assert set(sampled(logits, 0, steps=20, temperature=temperature, top_p=0.5)) == {1}


def test_the_same_seed_gives_the_same_tokens_and_different_seeds_differ() -> None:
    logits = torch.randn(49_152, generator=torch.Generator().manual_seed(1)) * 2
    for params in ({"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9}):
        first = sampled(logits, 11, steps=30, **params)
        assert first == sampled(logits, 11, steps=30, **params)
        assert first != sampled(logits, 12, steps=30, **params)


def test_logit_bias_forces_forbids_and_ignores_ids_outside_the_vocabulary() -> None:
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert set(sampled(logits, 0, steps=30, temperature=1.0, logit_bias={2: 100.0})) == {2}
    assert 0 not in set(sampled(logits, 0, steps=200, temperature=1.0, logit_bias={0: -100.0, 9: 100.0, -1: 5.0}))
    assert sampled(logits, 0, logit_bias={1: 4.0, 3: 6.0, 4: 100.0}) == [3]  # greedy, not plain


class CountingBias(dict[int, float]):
    """A logit_bias that counts how often it is read."""

    reads = 0

    def items(self):  # type: ignore[no-untyped-def]
        CountingBias.reads += 1
        return super().items()


def test_logit_bias_is_read_once_per_row_not_once_per_step() -> None:
    """300 entries applied in a Python loop cost ~1.5 ms a row every step."""
    CountingBias.reads = 0
    bias = CountingBias({t: 1.0 for t in range(0, 3000, 10)})
    sampled(torch.zeros(4096), 0, steps=10, temperature=1.0, logit_bias=bias)
    assert CountingBias.reads == 1


def test_presence_and_frequency_penalties_lower_emitted_tokens() -> None:
    row = decoder(presence_penalty=1.0, frequency_penalty=0.5)
    for token in (3, 3, 4):
        row.observe(token)
    out = row.process(torch.zeros(VOCAB))
    assert out[3] == -2.0 and out[4] == -1.5 and out[5] == 0.0


def test_sampling_needs_no_multinomial_and_no_full_sort_when_the_nucleus_is_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """multinomial over 49k tokens cost ~1 ms a row; sorting them for top_p ~4 ms."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    monkeypatch.setattr(torch.Tensor, "sort", refuse)
    monkeypatch.setattr(np, "sort", refuse)
    logits = torch.randn(49_152, generator=torch.Generator().manual_seed(2)) * 5
    assert len(set(sampled(logits, 0, steps=50, temperature=1.0, top_p=0.9))) > 1
    assert len(set(sampled(logits, 0, steps=50, temperature=1.0))) > 1
