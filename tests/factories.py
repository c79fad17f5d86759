"""Test factories shared by test modules (test modules never import from each other): small fakes of
service collaborators. Each fake implements only what the code under test uses, and says so."""

from __future__ import annotations

import shutil
from pathlib import Path

from service import users
from service.db.migrate import upgrade
from service.db.session import Database, unit_of_work
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
