"""One row's text as its tokens arrive: decoded incrementally, cut at the first stop string (matched across
token boundaries, never included), with each kept token's text offset and logprobs. Pure: no engine, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.types import TokenEvent, TokenLogprob
from service.inference.tokens import PromptCodec, TextStream


@dataclass(frozen=True)
class TokenOut:
    token_id: int
    offset: int  # where its text starts in the completion text
    logprob: float | None
    top: tuple[TokenLogprob, ...]


class RowText:
    def __init__(self, codec: PromptCodec, stop: tuple[str, ...]) -> None:
        self._stream = TextStream(codec)
        self._stop = stop
        # A stop string may begin in text already decoded: keep this many characters back until it cannot.
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._sent = 0
        self._cut: int | None = None
        self._taken = 0
        self._finished = False
        self._events: list[TokenEvent] = []
        self.tokens: list[TokenOut] = []  # those whose text is decoded (a stop string's are cut)

    @property
    def stopped(self) -> bool:
        """A stop string was found: the row must end (its text ends before the stop string)."""
        return self._cut is not None

    @property
    def text(self) -> str:
        return self._stream.text if self._cut is None else self._stream.text[: self._cut]

    def push(self, event: TokenEvent) -> str:
        """Records a token; returns the text that can be sent now (never part of a possible stop string)."""
        self._events.append(event)
        self._stream.push(event.token_id)
        self._place_tokens()
        return self._advance(final=False)

    def finish(self) -> str:
        """The row ended: the rest of the text (a trailing partial character, held-back characters); every
        token left is then given by `take_tokens`, text-less ones too."""
        self._stream.flush()
        self._place_tokens()
        self._finished = True
        return self._advance(final=True)

    def _place_tokens(self) -> None:
        """Tokens whose text is out of the stream (so their offsets are known) join `tokens`."""
        offsets = self._stream.offsets
        while self._cut is None and len(self.tokens) < len(offsets):
            event = self._events[len(self.tokens)]
            self.tokens.append(TokenOut(event.token_id, offsets[len(self.tokens)], event.logprob, event.top))

    def _advance(self, *, final: bool) -> str:
        if self._cut is not None:
            return ""
        text = self._stream.text
        cut = self._first_stop(text)
        if cut is not None:
            self._cut = cut
            self.tokens = [t for t in self.tokens if t.offset < cut]
            end = cut
        else:
            end = len(text) if final else max(self._sent, len(text) - self._hold)
        delta, self._sent = text[self._sent : end], max(self._sent, end)
        return delta

    def take_tokens(self) -> list[TokenOut]:
        """The tokens whose text starts in what has been sent, not yet taken (streamed logprobs); after `finish`,
        all the rest (so that streamed logprobs hold every token, those with no text too)."""
        end = len(self.tokens) if self._finished else self._taken
        while end < len(self.tokens) and self.tokens[end].offset < self._sent:
            end += 1
        taken, self._taken = self.tokens[self._taken : end], end
        return taken

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self._sent - self._hold)
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None
