"""The operator's side of sealing (`oppu keys ...`): how much is still plaintext, sealing an existing deployment
in place (resumable batches, each its own transaction), the master-key rotation's loop, and THE body of a
per-user data-key rotation (`rotate_user`: the background job `user_key_rotation` and `oppu keys rotate-user`).
Sealing in place and the master-key rotation rewrite stored rows: each ends by saying where the rows' old bytes
may still be on disk (`OldBytes`: a SQLite database is checkpointed so they leave its files).
The SQL is in the repositories; this module only sequences them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.accounts.repository import hold_for_sealed_write
from service.adapters import repository as adapter_repo
from service.adapters.store import AdapterStore, VersionNotFoundError
from service.db.session import checkpoint_wal, unit_of_work
from service.history import repository as history_repo
from service.history.repository import OwnerRef
from service.sealing.service import Sealer

Progress = Callable[[int], None]
# Where the old bytes of rewritten rows (plaintext, data keys wrapped under a retired master key) may still be:
# "gone" (SQLite, checkpointed), "until_checkpoint" (SQLite, the checkpoint was blocked by another connection
# reading: run the command again), "until_vacuum" (PostgreSQL: dead row versions until VACUUM reclaims them).
OldBytes = Literal["gone", "until_checkpoint", "until_vacuum"]


@dataclass(frozen=True)
class Rewritten:
    """What an operation that rewrote stored rows did: how many rows, keys or files, and where the old bytes are."""

    count: int
    old_bytes: OldBytes


def old_bytes_after_rewrite(engine: Engine | None) -> OldBytes:
    """Once rewritten rows committed: a SQLite database's WAL is copied into its file (whose freed space
    secure_delete zeroes) and truncated, so neither file holds the old bytes; a connection that keeps reading
    past the busy timeout (a serving replica's long read) blocks that: "until_checkpoint". PostgreSQL keeps the
    old row versions as dead tuples until VACUUM: "until_vacuum" (README: Encryption at rest)."""
    if engine is None:
        return "gone"  # no database: nothing was rewritten
    if engine.dialect.name != "sqlite":
        return "until_vacuum"
    return "gone" if checkpoint_wal(engine) else "until_checkpoint"


def plaintext_counts(session: Session) -> dict[str, int]:
    items, profiles = history_repo.count_plaintext(session)
    return {"history_items": items, "profiles": profiles, "adapter_versions": adapter_repo.count_unsealed(session)}


def seal_existing(
    factory: sessionmaker[Session], store: AdapterStore, *, batch: int = 500, progress: Progress
) -> Rewritten:
    """Seal every plaintext row and adapter file, batch by batch (an interrupted run resumes where it stopped:
    what is sealed stays sealed and is not touched again), then checkpoint the database (the plaintext leaves its
    files). Returns how many rows and versions were sealed, and where the old plaintext may still be."""
    if not store.sealing:
        raise ValueError("sealing is off (OPPU_SEAL_AT_REST=false or no master key): nothing to seal with")
    total = 0
    while True:
        with unit_of_work(factory) as session:
            done = history_repo.seal_plaintext(session, batch)
        total += done
        progress(done)
        if done == 0:
            break
    while True:
        with unit_of_work(factory) as session:
            versions = [(row.owner_key, row.version) for row in adapter_repo.unsealed_versions(session, batch)]
        for owner_key, version in versions:  # one transaction each: it holds its owner's lock while it seals
            with unit_of_work(factory) as session:
                row = adapter_repo.get_version(session, owner_key, version)
                if row is None or row.sealed:
                    continue  # deleted or sealed meanwhile
                if row.user_pk is not None:
                    # As every sealed write: a data-key rotation's sweep of this user then sees the file
                    # sealed, or runs first; never a file sealed under a version the rotation destroys.
                    hold_for_sealed_write(session, row.user_pk)
                try:
                    store.reseal_version(owner_key, version)
                except (VersionNotFoundError, FileNotFoundError):
                    pass  # files already gone (pruned): the row is marked so it is not looked at again
                row.sealed = True
        total += len(versions)
        progress(len(versions))
        if not versions:
            break
    bind = factory.kw.get("bind")
    return Rewritten(total, old_bytes_after_rewrite(bind if isinstance(bind, Engine) else None))


def rotate_master(sealer: Sealer, *, batch: int = 500, progress: Progress, settle_s: float = 0.0) -> Rewritten:
    """Re-wrap every data key under the primary master key. Loops until none is left under another key (a
    replica that had not yet seen the new keyset may wrap a new user's key under the old one meanwhile), then
    checkpoints the keyring (the old wrappings leave its files). Returns how many keys were re-wrapped, and
    where the old wrappings may still be."""
    total = 0
    while True:
        done = sealer.rewrap_batch(batch)
        total += done
        progress(done)
        if done == 0:
            if settle_s <= 0:
                return Rewritten(total, old_bytes_after_rewrite(sealer.keyring_engine))
            time.sleep(settle_s)  # one more pass after replicas have re-read the keyset
            settle_s = 0.0


SETTLE_MARGIN_S = 1.0  # beyond OPPU_KEY_RECHECK_S: a write that picked the old key just before the recheck commits
MAX_SWEEPS = 20  # sweeps that keep finding values under an old key: something still seals under it; stop, keep it


class RotationStalled(RuntimeError):
    """Values kept appearing under an old data-key version sweep after sweep: the old version is kept."""


def settle_seconds(recheck_s: float) -> float:
    """How long a rotation waits between making the new version and re-sealing: every process re-checks its
    cached keys within `recheck_s` (Sealer's rule), plus a margin for writes in flight."""
    return recheck_s + SETTLE_MARGIN_S


def rotate_user(
    factory: sessionmaker[Session],
    store: AdapterStore,
    sealer: Sealer,
    owner: OwnerRef,
    *,
    settle_s: float,
    notify: Callable[[str], None] = lambda _storage_key: None,
    progress: Callable[[float], None] = lambda _fraction: None,
) -> int:
    """A new data key for one user, their data re-sealed under it, the old versions destroyed; safe with
    several processes sealing for the user meanwhile (API replicas, workers):

    1. make version v+1; `notify` tells every replica to forget the owner's cached keys (the outbox notice);
    2. wait `settle_s` (>= OPPU_KEY_RECHECK_S + a margin): by then no process seals under v any more, even one
       that missed the notice (Sealer re-checks its cached versions at least that often);
    3. re-seal every history row, the profile and every adapter file still under an older version, sweep after
       sweep until one finds none (a write picked the old key before the recheck may commit late);
    4. destroy the versions below v+1, and notify again (the old key leaves every replica's memory).

    Interrupted anywhere, it is simply run again (a fresh version; nothing is destroyed before step 4).
    `progress(fraction)` is called between steps (a job's heartbeat check may raise there to stop). Raises
    UserDataErased when the user is erased meanwhile, RotationStalled when values keep appearing under an old
    version. Returns how many rows and adapter versions were re-sealed."""
    new_version = sealer.rotate_user(owner.storage_key)
    notify(owner.storage_key)
    progress(0.05)
    deadline = time.monotonic() + settle_s
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
        progress(0.05 + 0.45 * (1 - max(0.0, deadline - time.monotonic()) / settle_s))
    done = 0
    for sweep in range(MAX_SWEEPS):
        found = _reseal_once(factory, store, owner, new_version)
        done += found
        progress(min(0.95, 0.5 + 0.05 * (sweep + 1)))
        if found == 0:
            break
    else:
        raise RotationStalled(
            f"values kept appearing under an old data key after {MAX_SWEEPS} sweeps (a process that does not "
            "re-check its keys?); the old key is kept, run the rotation again"
        )
    sealer.drop_versions_below(owner.storage_key, new_version)
    notify(owner.storage_key)
    return done


def _reseal_once(factory: sessionmaker[Session], store: AdapterStore, owner: OwnerRef, new_version: int) -> int:
    """One sweep: the owner's rows (one transaction, so a concurrent append waits and its keyed hash matches)
    and adapter files not under `new_version` re-sealed. Returns how many rows and versions changed."""
    with unit_of_work(factory) as session:
        done = history_repo.reseal(session, owner)
        versions = [row.version for row in adapter_repo.list_versions(session, owner.storage_key)]
    for version in versions:
        try:
            done += store.reseal_version(owner.storage_key, version, current=new_version)
        except (VersionNotFoundError, FileNotFoundError):
            pass  # pruned meanwhile
    return done
