"""Test factories shared by test modules (test modules never import from each other): small fakes of
service collaborators. Each fake implements only what the code under test uses, and says so."""

from __future__ import annotations

import shutil
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from service import users
from service.db.migrate import upgrade
from service.db.session import Database, unit_of_work
from service.engine.base import EngineLimits
from service.engine.types import (
    AdapterRef,
    EngineEvent,
    EngineRequest,
    EngineStats,
    Finished,
    FinishReason,
    TokenEvent,
    TokenLogprob,
)
from service.inference.tokens import PromptCodec
from service.tenancy import UserRef


class FakeCodec(PromptCodec):
    """A byte-level stand-in for the served tokenizer, with no model files: token id b < 256 is the byte b
    (so one non-ASCII character spans several tokens, as with the real byte-level BPE), EOS ends a turn (the
    only stop token), BOS starts every encoded prompt. Decoding replaces an incomplete UTF-8 sequence with
    U+FFFD, as Hugging Face tokenizers do. Implements what the request path uses: encode_text, encode_chat,
    encode_continuation, decode, token_text, stop_ids and vocab_size."""

    EOS = 256
    BOS = 257

    def __init__(self, vocab_size: int = 300) -> None:  # no super().__init__: there is no tokenizer
        self.tokenizer = None
        self.stop_ids = frozenset({self.EOS})
        self.vocab_size = vocab_size

    @staticmethod
    def ids(text: str) -> list[int]:
        """The tokens of `text` with nothing added (one per UTF-8 byte)."""
        return list(text.encode("utf-8"))

    def encode_text(self, text: str) -> list[int]:
        return [self.BOS, *self.ids(text)]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        turns = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return [self.BOS, *self.ids(turns + "<assistant>")]

    def encode_continuation(self, text: str) -> list[int]:
        return self.ids(text)

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        if token_id == self.EOS:
            return "<eos>"
        if token_id == self.BOS:
            return "<bos>"
        return self.decode([token_id])


class FakeEngine:
    """An engine that offers `limits` and `model_name` and records every other use in `calls` (so a test can
    assert that something had no engine effects). `stream` plays `reply`: one token per UTF-8 byte (FakeCodec's
    ids), each with logprob -0.5 and, when asked for, top logprobs, then Finished(`finish`); its requests are
    kept in `requests`."""

    def __init__(self, limits: EngineLimits, reply: str = "", finish: FinishReason = "stop") -> None:
        self._limits = limits
        self._reply = FakeCodec.ids(reply)
        self._finish: FinishReason = finish
        self.calls: list[str] = []
        self.requests: list[EngineRequest] = []

    @property
    def model_name(self) -> str:
        return "fake-base"

    @property
    def limits(self) -> EngineLimits:
        return self._limits

    @property
    def context_length(self) -> int:
        self.calls.append("context_length")
        return self._limits.context_length

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        self.calls.append("stream")
        self.requests.append(request)
        k = request.sampling.logprobs
        tokens = self._reply[: request.sampling.max_new_tokens]
        for t in tokens:
            top = tuple(TokenLogprob(t + i, -0.5 - i) for i in range(k or 0))
            yield TokenEvent(t, -0.5 if k is not None else None, top)
        finish = self._finish if len(tokens) == len(self._reply) else "length"
        yield Finished(finish, len(request.prompt_ids))

    def cancel_tenant(self, tenant: str, error: BaseException) -> int:
        self.calls.append("cancel_tenant")
        return 0

    def use_shared(self, adapter: AdapterRef | None) -> None:
        self.calls.append("use_shared")

    def drop_owner(self, owner_key: str) -> None:
        self.calls.append("drop_owner")

    def stats(self) -> EngineStats:
        self.calls.append("stats")
        return EngineStats(0, 0, 0, 0, 0)

    def __getattr__(self, name: str) -> Any:  # an engine method added later (prefetch, ...): recorded too
        if name.startswith("__"):  # copy, pickle and friends probe for these: not engine use
            raise AttributeError(name)
        self.calls.append(name)
        return lambda *args, **kwargs: None


def migrated_sqlite(folder: Path) -> Path:
    """A migrated SQLite database file in `folder`: a template for `sqlite_copy` (migrating takes ~0.5 s,
    copying the file a few ms), e.g. in a module-scoped fixture."""
    path = folder / "template.sqlite3"
    upgrade(f"sqlite:///{path}")
    return path


def sqlite_copy(template: Path, folder: Path) -> Database:
    """A fresh database for one test: a copy of a migrated template, opened as the app opens it (WAL, foreign
    keys). Dispose of `.engine` at the end."""
    path = folder / "db.sqlite3"
    shutil.copyfile(template, path)
    return Database.open(f"sqlite:///{path}")


def new_user(db: Database, user_id: str) -> tuple[UserRef, str]:
    """A user created as the admin API creates one (service/users.py, one unit of work): its ref and API key."""
    with unit_of_work(db.session_factory) as session:
        return users.create_user(session, user_id)
