"""Per-row token choice from one step's logits: logprobs under the raw distribution, then the row's logits
processors (logit bias, presence/frequency penalties, min_tokens, a grammar mask) and greedy or seeded
top-p sampling. Every row is isolated: non-finite logits or an exception end that row only.

All of it runs on the engine thread for every row of every step, so one row's options must stay cheap for the
others: each processor is one tensor op, top-p looks at the top _TOP_K probabilities before sorting the whole
vocabulary, and a draw is one uniform number from the row's own generator against the running sum.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from service.engine.types import GrammarMatcher, SamplingParams, TokenLogprob
from service.errors import GenerationFailed

log = logging.getLogger(__name__)

# top_p's nucleus is usually far smaller than this: a topk this size (~0.1 ms) replaces sorting 49k (~4 ms).
_TOP_K = 1024


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: float | None = None
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class RowDecoder:
    """One row's decoding state: its seeded generator, its emitted tokens (penalties, min_tokens), its grammar."""

    params: SamplingParams
    generator: torch.Generator | None = None
    emitted: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    grammar: GrammarMatcher | None = None
    # logit_bias as (ids, values) for one vocabulary size, built once: a Python loop cost ~1.5 ms a step.
    _bias: tuple[int, torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_params(cls, params: SamplingParams, device: torch.device) -> RowDecoder:
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        grammar = params.grammar.matcher() if params.grammar is not None else None
        return cls(params, gen, grammar=grammar)

    @property
    def plain(self) -> bool:
        """Nothing to apply to the logits this step."""
        p = self.params
        hold_stop = self.emitted < p.min_tokens and not p.ignore_eos
        return p.plain and not hold_stop and self.grammar is None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        out = logits.clone()
        if p.logit_bias:
            ids, bias = self._bias_for(out)
            out.index_add_(0, ids, bias)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long, device=out.device)
            n = torch.tensor(list(self.counts.values()), dtype=out.dtype, device=out.device)
            out.index_add_(0, ids, -(p.presence_penalty + p.frequency_penalty * n))
        stops = [t for t in p.stop_token_ids if 0 <= t < out.shape[0]]
        hold_stop = self.emitted < p.min_tokens and not p.ignore_eos and bool(stops)
        if self.grammar is not None:
            allowed = torch.from_numpy(self.grammar.allowed(out.shape[-1])).to(out.device)
            if hold_stop and not bool(allowed.index_fill(0, torch.tensor(stops, device=out.device), False).any()):
                hold_stop = False  # the grammar is complete: only a stop may follow, min_tokens cannot hold it
            out.masked_fill_(~allowed, float("-inf"))
        if hold_stop:
            out[stops] = float("-inf")
        # The logits were finite and every processor adds a finite value or -inf: max is a cheap "any finite".
        if not bool(out.max() > float("-inf")):  # argmax would pick token 0, which nothing allowed
            raise GenerationFailed.nothing_allowed()
        return out

    def _bias_for(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = logits.shape[0]
        if self._bias is None or self._bias[0] != size or self._bias[2].dtype != logits.dtype:
            kept = [(t, b) for t, b in self.params.logit_bias.items() if 0 <= t < size]
            ids = torch.tensor([t for t, _ in kept], dtype=torch.long, device=logits.device)
            values = torch.tensor([b for _, b in kept], dtype=logits.dtype, device=logits.device)
            self._bias = (size, ids, values)
        return self._bias[1], self._bias[2]

    def pick(self, logits: torch.Tensor) -> int:
        p = self.params
        if self.generator is None:
            return int(logits.argmax())
        scaled = logits.float()
        # Subtract the max BEFORE dividing: a tiny temperature would otherwise make inf - inf = NaN.
        probs = torch.softmax((scaled - scaled.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            return _top_p(probs, p.top_p, self.generator)
        return _draw(probs, self.generator)

    def observe(self, token: int) -> None:
        self.emitted += 1
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        if self.grammar is not None:
            self.grammar.accept(token)


def _top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """Draw from the smallest prefix of the descending probabilities whose mass reaches top_p (the top token
    always survives; of equal probabilities the lower token ids come first, as a stable sort)."""
    values, ids = probs.topk(min(_TOP_K, probs.shape[0]))
    mass = values.cumsum(0)
    flat = values.shape[0] < probs.shape[0] and float(mass[-1]) < top_p
    if flat:  # the nucleus is larger than _TOP_K
        values = _sorted_descending(probs)
        mass = values.cumsum(0)
    n = int(((mass - values) < top_p).sum())
    # topk orders equal values arbitrarily: its first n are the nucleus unless equal values straddle the edge.
    if not flat and (n == probs.shape[0] or (n < values.shape[0] and bool(values[n] < values[n - 1]))):
        return int(ids[_draw(values[:n], generator)])
    # Otherwise the nucleus follows from its smallest probability and how many of its ties it keeps.
    least = values[n - 1]
    above = probs > least
    tied = probs == least
    keep = above | (tied & (tied.cumsum(0) <= n - int(above.sum())))
    return _draw(torch.where(keep, probs, 0.0), generator)


def _sorted_descending(probs: torch.Tensor) -> torch.Tensor:
    if probs.device.type == "cpu":  # numpy's sort of the values alone is ~4x torch's (which also sorts indices)
        return torch.from_numpy(np.sort(probs.numpy())).flip(0)
    return probs.sort(descending=True).values


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index i with probability weights[i] / sum, from one uniform draw against the running sum in double
    (exact, as multinomial, which cost ~1 ms a row on a 49k vocabulary). A zero weight is never drawn."""
    cdf = weights.double().cumsum(0)
    total = cdf[-1]
    if not bool(torch.isfinite(total)) or not bool(total > 0):
        raise ValueError("the row's probabilities are not a distribution")
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=weights.device) * total
    i = int(torch.searchsorted(cdf, u, right=True))
    # u < 1 but u * total may round up to total: then the last token with any weight.
    return i if i < weights.shape[0] else int(weights.nonzero()[-1])


def _logprobs(row: torch.Tensor, token: int, k: int) -> tuple[float, tuple[TokenLogprob, ...]]:
    lp = torch.log_softmax(row.float(), dim=-1)
    top: tuple[TokenLogprob, ...] = ()
    if k > 0:
        values, ids = lp.topk(k)
        top = tuple(TokenLogprob(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return float(lp[token]), top


def choose(decoders: list[RowDecoder], logits: torch.Tensor) -> list[Choice | GenerationFailed]:
    """One token per row; a row that cannot get one gets its own error instead."""
    # NaN propagates through max and min: isfinite over every logit cost ~0.1 ms a row.
    finite = (torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))).tolist()
    greedy = any(dec.plain and dec.generator is None for dec in decoders)
    argmax = logits.argmax(dim=-1).tolist() if greedy else []  # every plain greedy row in one call
    out: list[Choice | GenerationFailed] = []
    for i, dec in enumerate(decoders):
        if not finite[i]:
            out.append(GenerationFailed.non_finite())
            continue
        try:
            token = argmax[i] if dec.plain and dec.generator is None else dec.pick(dec.process(logits[i]))
            k = dec.params.logprobs
            lp, top = _logprobs(logits[i], token, k) if k is not None else (None, ())
            out.append(Choice(token, lp, top))
        except GenerationFailed as exc:  # the row's own constraints: it alone ends, with its reason
            out.append(exc)
        except Exception as exc:  # this row's sampling/processing failed: it alone ends
            log.exception("sampling failed for one row")
            out.append(GenerationFailed.internal(exc))
    return out
