"""How a repository finds the sealer: the composition root attaches it to the session factory's `info`, so every
unit of work on the main database carries it. A session without one (a tool's own engine) reads plaintext rows
and writes plaintext; a sealed value it meets does not open (SealedDataUnreadable), never a wrong plaintext."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.sealing.service import Sealer, UserSeal

INFO_KEY = "oppu.sealer"
PLAINTEXT = Sealer(None, None, enabled=False)


def session_info(sealer: Sealer) -> dict[str, Any]:
    return {INFO_KEY: sealer}


def sealer_of(session: Session) -> Sealer:
    return _sealer_in(session.info)


def sealer_of_factory(factory: sessionmaker[Session]) -> Sealer:
    """The sealer every session of `factory` carries (what `session_info` attached)."""
    return _sealer_in(factory.kw.get("info") or {})


def _sealer_in(info: dict[str, Any]) -> Sealer:
    sealer = info.get(INFO_KEY)
    return sealer if isinstance(sealer, Sealer) else PLAINTEXT


def seal_of(session: Session, owner_key: str) -> UserSeal:
    return sealer_of(session).user(owner_key)
