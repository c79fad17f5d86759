"""generation/service.stream: a row's streamed deltas carry every token the whole completion has (streamed logprobs
equal non-streamed ones), those that decode to no text too, on the byte-level fake codec."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from service.engine.types import EngineEvent, EngineRequest, Finished, SamplingParams, TokenEvent
from service.generation import service
from service.generation.prepare import PreparedRequest, Preparer
from service.generation.service import Completion, Delta
from tests.factories import FakeCodec

CODEC = FakeCodec()
EOS = FakeCodec.EOS  # a stop token: no text


@dataclass
class _Engine:
    """Plays `ids`, one token event each (with a distinct logprob), then Finished."""

    ids: list[int]
    requests: list[EngineRequest] = field(default_factory=list)

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        for i, t in enumerate(self.ids):
            yield TokenEvent(t, -0.01 * (i + 1))
        yield Finished("length", len(request.prompt_ids))


@dataclass
class _Preparer:
    engine: _Engine
    codec: FakeCodec = CODEC


def run(ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[Delta], Completion]:
    row = EngineRequest("r", (FakeCodec.BOS,), SamplingParams(max_new_tokens=64, logprobs=0), None, "t", 0.0)
    prepared = PreparedRequest((row,), (), None, None, stop)

    async def parts() -> list[Delta | Completion]:
        return [p async for p in service.stream(cast(Preparer, _Preparer(_Engine(ids))), prepared)]

    *deltas, done = asyncio.run(parts())
    assert isinstance(done, Completion) and all(isinstance(d, Delta) for d in deltas)
    return cast(list[Delta], deltas), done


@pytest.mark.parametrize(
    ("ids", "stop"),
    [
        ([*CODEC.ids("ok"), EOS, EOS, EOS], ()),  # trailing tokens with no text
        ([EOS, EOS], ()),  # only such tokens: no text at all
        ([*CODEC.ids("a"), EOS, *CODEC.ids("é€b")], ()),  # one in the middle, then characters split over tokens
        ([*CODEC.ids("ab"), CODEC.ids("é")[0]], ()),  # a trailing partial character
        ([*CODEC.ids("abcEN"), EOS], ("END",)),  # held back for a stop string that never comes
        ([*CODEC.ids("abEND"), EOS], ("END",)),  # cut at a stop string
    ],
)
def test_streamed_tokens_are_the_completion_tokens(ids: list[int], stop: tuple[str, ...]) -> None:
    deltas, done = run(ids, stop)
    assert "".join(d.text for d in deltas) == done.text
    streamed: list[Any] = [t for d in deltas for t in d.tokens]
    assert streamed == done.tokens
    if not stop:
        assert len(streamed) == len(ids)


def test_the_last_delta_carries_trailing_text_less_tokens_with_no_text() -> None:
    deltas, done = run([*CODEC.ids("hi"), EOS, EOS])
    assert deltas[-1].text == ""
    assert [(t.token_id, t.offset) for t in deltas[-1].tokens] == [(EOS, 2), (EOS, 2)]
    assert done.text == "hi"
