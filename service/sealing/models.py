"""The keyring's schema: its own database (OPPU_KEYRING_URL), apart from the data it protects, so a backup of
the main database or the adapter store holds ciphertext only. Created by `create_all` on start (two tables)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Integer, LargeBinary, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class KeyringBase(DeclarativeBase):
    metadata = MetaData()


class DataKey(KeyringBase):
    """One version of a user's data key, only ever stored wrapped by a KEK (its id kept beside it)."""

    __tablename__ = "data_keys"

    owner_key: Mapped[str] = mapped_column(String(40), primary_key=True)  # the user's storage key
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(40), index=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ShreddedOwner(KeyringBase):
    """An erased owner: their keys are gone (crypto-shredding); this row says so, so that a restored backup of
    their data answers 'erased' and no new key is ever made for them. Holds no key material."""

    __tablename__ = "shredded_owners"

    owner_key: Mapped[str] = mapped_column(String(40), primary_key=True)
    shredded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
