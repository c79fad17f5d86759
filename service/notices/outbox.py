"""The notices outbox: a notice (key revoked, user erased, adapter changed, data key rotated) is written to SQL in the
transaction that causes it, and every API replica polls the table every OPPU_NOTICE_POLL_S, besides the Redis
pub/sub fast path (`jobs/queue.py`). A notice sent while Redis is down (its publish is lost) still reaches every
replica within the poll interval; correctness never waited on a message (requests read SQL), but ending a revoked
key's streams, an erased user's engine rows and their cached adapters and indexes did.

Each replica applies each notice once: the poller remembers the ids it applied, and skips what the fast path
(this replica's own local-first application, or pub/sub) applied already. PostgreSQL hands out ids at insert
and commits out of order, so the poller re-reads ids above a floor that trails the newest id by
COMMIT_LAG_S: a notice whose transaction commits up to that long after its insert is still seen."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.config import NOTICE_COMMIT_LAG_S
from service.db.session import unit_of_work
from service.jobs.queue import Listeners
from service.notices import repository as repo
from service.sealing.session import sealer_of_factory

log = logging.getLogger(__name__)
ADAPTER, REVOKED, ERASED, KEYS = "adapter", "revoked", "erased", "keys"
COMMIT_LAG_S = NOTICE_COMMIT_LAG_S  # longest gap between a notice's insert and its transaction's commit covered
PRUNE_EVERY_S = 60.0


# --- writing (in the caller's transaction) ---


def record_adapter(session: Session, owner_key: str, version: int | None) -> None:
    """The owner's adapters changed (published, deleted, erased, retired): replicas drop what they cache."""
    repo.add(session, owner_key, ADAPTER, f"{owner_key} {version if version is not None else 0}")


def record_revoked(session: Session, owner_key: str, key_hashes: Iterable[str]) -> None:
    """These keys (of the user with this storage key) were revoked: their streams end on every replica."""
    hashes = sorted(set(key_hashes))
    if hashes:
        repo.add(session, owner_key, REVOKED, ",".join(hashes))


def record_erased(session: Session, storage_key: str) -> None:
    """The user was erased: their queued and running engine rows end on every replica."""
    repo.add(session, storage_key, ERASED, storage_key)


def record_keys(session: Session, storage_key: str) -> None:
    """The user's data key rotated: every replica forgets their cached keys (and re-reads the keyring)."""
    repo.add(session, storage_key, KEYS, storage_key)


# --- reading (every API replica) ---


class _Recent:
    """What the fast path applied lately, by content (a key hash, a storage key, "owner version"): the
    poller does not apply it a second time. One note answers for one outbox notice: a later notice with the
    same content (an adapter delete's "owner 0", then that user's erase) is applied even when the fast path
    missed it."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._lock = threading.Lock()
        self._at: dict[tuple[str, str], float] = {}

    def note(self, kind: str, keys: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._at[(kind, key)] = now
            if len(self._at) > 10_000 or any(now - t > self._keep_s for t in self._at.values()):
                self._at = {k: t for k, t in self._at.items() if now - t <= self._keep_s}

    def take(self, kind: str, keys: Iterable[str]) -> list[str]:
        """The keys the fast path has NOT applied lately; the notes of those it has are used up."""
        with self._lock:
            return [k for k in keys if self._at.pop((kind, k), None) is None]


class NoticePoller:
    """One replica's reader of the outbox: `fast_path` are the listeners to subscribe on the queue (they note
    what they apply); `poll_once` applies every notice this replica has not applied yet."""

    def __init__(self, session_factory: sessionmaker[Session], listeners: Listeners, keep_s: float) -> None:
        self._factory = session_factory
        self._listeners = listeners
        self._keep_s = keep_s
        # A data-key notice: the listener given, else the sealer every session of this factory carries forgets.
        self._forget_keys = listeners.keys if listeners.keys is not None else sealer_of_factory(session_factory).forget
        self._recent = _Recent(COMMIT_LAG_S + 30.0)
        self._seen: set[int] = set()
        self._marks: deque[tuple[float, int]] = deque()  # (when, newest id seen then): the floor trails them
        self._pruned_at = 0.0
        with unit_of_work(session_factory) as session:
            self._floor = repo.last_id(session)  # a process that just started has nothing to drop or end
        self.fast_path = Listeners(self._fast_adapter, self._fast_revoked, self._fast_erased, self._fast_keys)
        self._thread: threading.Thread | None = None

    def _fast_adapter(self, owner_key: str, version: int | None) -> None:
        self._recent.note(ADAPTER, [f"{owner_key} {version if version is not None else 0}"])
        self._listeners.adapter(owner_key, version)

    def _fast_revoked(self, key_hashes: list[str]) -> object:
        self._recent.note(REVOKED, key_hashes)
        return self._listeners.revoked(key_hashes)

    def _fast_erased(self, storage_key: str) -> object:
        self._recent.note(ERASED, [storage_key])
        return self._listeners.erased(storage_key) if self._listeners.erased is not None else None

    def _fast_keys(self, storage_key: str) -> object:
        return self._forget_keys(storage_key)  # not noted: forgetting twice is harmless (the poller does it again)

    def poll_once(self) -> int:
        """Apply the notices not applied here yet; returns how many were applied."""
        with unit_of_work(self._factory) as session:
            rows = repo.after(session, self._floor)
        applied = 0
        for seq, kind, payload in rows:
            if seq in self._seen:
                continue
            self._seen.add(seq)
            applied += self._apply(kind, payload)
        self._advance(max([self._floor, *(seq for seq, _, _ in rows)]))
        return applied

    def _apply(self, kind: str, payload: str) -> int:
        try:
            if kind == REVOKED:
                hashes = self._recent.take(REVOKED, [h for h in payload.split(",") if h])
                if hashes:
                    self._listeners.revoked(hashes)
                return int(bool(hashes))
            if kind == KEYS:  # always: a second rotation's notice within the dedupe window must not be skipped
                self._forget_keys(payload)
                return 1
            if not self._recent.take(kind, [payload]):
                return 0
            if kind == ERASED and self._listeners.erased is not None:
                self._listeners.erased(payload)
            elif kind == ADAPTER:
                owner, _, version = payload.partition(" ")
                self._listeners.adapter(owner, int(version) if version.isdigit() and int(version) > 0 else None)
            return 1
        except Exception:  # one listener's fault never stops the notices after it
            log.exception("applying a %s notice failed", kind)
            return 0

    def _advance(self, newest: int) -> None:
        now = time.monotonic()
        self._marks.append((now, newest))
        while self._marks and now - self._marks[0][0] >= COMMIT_LAG_S:
            self._floor = max(self._floor, self._marks.popleft()[1])
        self._seen = {s for s in self._seen if s > self._floor}

    def prune(self) -> int:
        """Delete notices older than OPPU_NOTICE_KEEP_S (any replica may: the same rows go either way)."""
        with unit_of_work(self._factory) as session:
            return repo.prune(session, datetime.now(UTC) - timedelta(seconds=self._keep_s))

    def start(self, poll_s: float, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self.run, args=(poll_s, stop), name="oppu-notices", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """After `stop` is set: wait for a poll in progress, so no connection of the pool is still checked out
        when the database is disposed (one would be closed by the garbage collector, not by us)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self, poll_s: float, stop: threading.Event) -> None:
        """Poll until `stop` is set (a daemon thread); a database fault is logged and retried next tick."""
        while not stop.wait(poll_s):
            try:
                self.poll_once()
                if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                    self._pruned_at = time.monotonic()
                    self.prune()
            except Exception as exc:
                log.warning("polling the notices failed (%s); retrying", type(exc).__name__)


def start_polling(
    session_factory: sessionmaker[Session],
    listeners: Listeners,
    *,
    poll_s: float,
    keep_s: float,
    stop: threading.Event,
    subscribe: Callable[[Listeners], None],
) -> NoticePoller:
    """Subscribe the fast path (noting what it applies) and start the poller's daemon thread."""
    poller = NoticePoller(session_factory, listeners, keep_s)
    subscribe(poller.fast_path)
    poller.start(poll_s, stop)
    return poller
