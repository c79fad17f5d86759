"""ORM models. Every per-user row hangs off users.id with ON DELETE CASCADE.

Primary keys that outlive their row somewhere (a user's pk in a running job, a history item's id as a
training cutoff, an adapter's id in contributor rows) are never reused: AUTOINCREMENT on SQLite (a plain
rowid hands the largest erased pk to the next row); PostgreSQL sequences never go back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.adapters.store import SHARED_KEY
from service.db.base import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_storage_key() -> str:
    return uuid.uuid4().hex


# SQLite: never reuse the pk of a deleted row (PostgreSQL sequences never do).
NO_PK_REUSE = {"sqlite_autoincrement": True}


class User(Base):
    __tablename__ = "users"
    __table_args__ = NO_PK_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), unique=True)
    # Internal key for everything outside SQL (adapter folders, cache keys): never the raw user id.
    storage_key: Mapped[str] = mapped_column(String(32), unique=True, default=new_storage_key)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # What the user's history holds (items; characters of input + output): the quotas are checked on these.
    history_items: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    history_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # sha256 of the user's recovery code (shown once, at creation and at each rotation): an owner's own key
    # rotation needs it besides the key, so a stolen key alone cannot rotate the owner out. NULL: admin only.
    recovery_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex; the key is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # shown to humans to tell keys apart
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class HistoryItem(Base):
    __tablename__ = "history_items"
    __table_args__ = (
        UniqueConstraint("user_pk", "client_id", name="uq_history_items_user_client"),
        Index("ix_history_items_user_seq", "user_pk", "id"),
        NO_PK_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # The client's id (or a generated one); sealed rows keep only a keyed hash of it here (idempotency).
    client_id: Mapped[str] = mapped_column(String(128))
    # Plaintext columns, empty in a sealed row: its id, input, output, kind and metadata are in `sealed`.
    input: Mapped[str | None] = mapped_column(Text, nullable=True)
    output: Mapped[str] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(String(64), nullable=True)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    sealed: Mapped[str | None] = mapped_column(Text, nullable=True)  # service.sealing token, or NULL: plaintext
    timestamp: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Profile(Base):
    __tablename__ = "profiles"

    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    text: Mapped[str] = mapped_column(Text)  # "" when sealed
    source: Mapped[str] = mapped_column(String(16), default="user")  # user | generated
    sealed: Mapped[str | None] = mapped_column(Text, nullable=True)  # the text, sealed; NULL: plaintext
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


# Owner key of the shared task adapter (users own theirs by storage_key); the store reserves it.
SHARED_OWNER = SHARED_KEY


class AdapterHead(Base):
    """The current version per owner; publish/rollback are compare-and-set updates of this row."""

    __tablename__ = "adapter_heads"

    owner_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_pk: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    current_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)  # versions are never reused
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Adapter(Base):
    """One immutable published version of an adapter (files under the store, PEFT format)."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("owner_key", "version", name="uq_adapters_owner_version"), NO_PK_REUSE)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_key: Mapped[str] = mapped_column(String(32), index=True)
    user_pk: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    base_model: Mapped[str] = mapped_column(String(256))
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    nbytes: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # trained | imported
    shared_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # trained on top of
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(36), nullable=True, unique=True)  # idempotent publish
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A shared adapter trained on the history of a user who has since been erased (retrain to drop it).
    trained_on_erased: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Its files in the store are sealed under the owner's data key (service.sealing); false: plaintext files.
    sealed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class AdapterContributor(Base):
    """Whose history a shared adapter version was trained on (so that an erasure can flag it). By storage key,
    never by pk: a storage key is never reused, and a contributor erased while the shared job trained is
    still recognised as gone when the version is published."""

    __tablename__ = "adapter_contributors"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    storage_key: Mapped[str] = mapped_column(String(32), primary_key=True, index=True)


ACTIVE_JOB_STATES = ("queued", "running")


class Job(Base):
    """A training job. At most one active (queued/running) job per owner: a partial unique index."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index(
            "uq_jobs_active_owner",
            "owner_key",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
        Index("ix_jobs_status_finished_at", "status", "finished_at"),  # the reaper's scans and pruning
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # user_retrain | shared_retrain
    owner_key: Mapped[str] = mapped_column(String(40))
    user_pk: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # queued | running | succeeded | failed | cancelled
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cutoff_item_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # history snapshot
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # When the job was last put on the queue (request, retry, reaper): the reaper re-enqueues a queued job
    # only once this is older than OPPU_JOB_REQUEUE_AFTER_S, so one lost message costs one re-enqueue.
    requeued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Notice(Base):
    """The outbox of notices between replicas (key revoked, user erased, adapter changed): written in the
    transaction that causes it, polled by every replica besides the Redis pub/sub fast path. The id is the
    order (never reused: a replica remembers the ids it has applied)."""

    __tablename__ = "notices"
    __table_args__ = (NO_PK_REUSE,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # adapter | revoked | erased
    owner_key: Mapped[str] = mapped_column(String(40))  # the storage key it concerns (or the shared owner)
    payload: Mapped[str] = mapped_column(Text)  # what the pub/sub message carries
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
