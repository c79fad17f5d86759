"""Per-row token choice from one step's logits: logprobs under the raw distribution, then the row's logits
processors (logit bias, presence/frequency penalties, min_tokens, a grammar mask) and greedy or seeded
top-p sampling. Every row is isolated: non-finite logits or an exception end that row only.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch

from service.engine.types import GrammarMatcher, SamplingParams, TokenLogprob
from service.errors import GenerationFailed

log = logging.getLogger(__name__)


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
        for token, bias in p.logit_bias.items():
            if 0 <= token < out.shape[0]:
                out[token] += bias
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long, device=out.device)
            n = torch.tensor(list(self.counts.values()), dtype=out.dtype, device=out.device)
            out[ids] -= p.presence_penalty + p.frequency_penalty * n
        stops = [t for t in p.stop_token_ids if 0 <= t < out.shape[0]]
        hold_stop = self.emitted < p.min_tokens and not p.ignore_eos and bool(stops)
        if self.grammar is not None:
            allowed = torch.from_numpy(self.grammar.allowed(out.shape[-1])).to(out.device)
            if hold_stop and not bool(allowed.index_fill(0, torch.tensor(stops, device=out.device), False).any()):
                hold_stop = False  # the grammar is complete: only a stop may follow, min_tokens cannot hold it
            out.masked_fill_(~allowed, float("-inf"))
        if hold_stop:
            out[stops] = float("-inf")
        if not bool(torch.isfinite(out).any()):  # argmax would pick token 0, which nothing allowed
            raise GenerationFailed.nothing_allowed()
        return out

    def pick(self, logits: torch.Tensor) -> int:
        p = self.params
        if self.generator is None:
            return int(logits.argmax())
        scaled = logits.float()
        # Subtract the max BEFORE dividing: a tiny temperature would otherwise make inf - inf = NaN.
        probs = torch.softmax((scaled - scaled.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True, stable=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
            sorted_p = sorted_p * ((sorted_p.cumsum(0) - sorted_p) < p.top_p)
            return int(order[torch.multinomial(sorted_p, 1, generator=self.generator)[0]])
        return int(torch.multinomial(probs, 1, generator=self.generator)[0])

    def observe(self, token: int) -> None:
        self.emitted += 1
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        if self.grammar is not None:
            self.grammar.accept(token)


def _logprobs(row: torch.Tensor, token: int, k: int) -> tuple[float, tuple[TokenLogprob, ...]]:
    lp = torch.log_softmax(row.float(), dim=-1)
    top: tuple[TokenLogprob, ...] = ()
    if k > 0:
        values, ids = lp.topk(k)
        top = tuple(TokenLogprob(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return float(lp[token]), top


def choose(decoders: list[RowDecoder], logits: torch.Tensor) -> list[Choice | GenerationFailed]:
    """One token per row; a row that cannot get one gets its own error instead."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    argmax = logits.argmax(dim=-1).tolist()  # every plain greedy row in one call
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
