"""The operator's side of sealing (`oppu keys ...`): how much is still plaintext, sealing an existing deployment
in place (resumable batches, each its own transaction), and the master-key rotation's loop. The SQL is in the
repositories; this module only sequences them."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from service.adapters import repository as adapter_repo
from service.adapters.store import AdapterStore, VersionNotFoundError
from service.db.session import unit_of_work
from service.history import repository as history_repo
from service.history.repository import OwnerRef
from service.sealing.service import Sealer

Progress = Callable[[int], None]


def plaintext_counts(session: Session) -> dict[str, int]:
    items, profiles = history_repo.count_plaintext(session)
    return {"history_items": items, "profiles": profiles, "adapter_versions": adapter_repo.count_unsealed(session)}


def seal_existing(factory: sessionmaker[Session], store: AdapterStore, *, batch: int = 500, progress: Progress) -> int:
    """Seal every plaintext row and adapter file, batch by batch (an interrupted run resumes where it stopped:
    what is sealed stays sealed and is not touched again). Returns how many rows and versions were sealed."""
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
            rows = adapter_repo.unsealed_versions(session, batch)
            for row in rows:
                try:
                    store.reseal_version(row.owner_key, row.version)
                except (VersionNotFoundError, FileNotFoundError):
                    pass  # files already gone (pruned): the row is marked so it is not looked at again
                row.sealed = True
        total += len(rows)
        progress(len(rows))
        if not rows:
            break
    return total


def rotate_master(sealer: Sealer, *, batch: int = 500, progress: Progress, settle_s: float = 0.0) -> int:
    """Re-wrap every data key under the primary master key. Loops until none is left under another key (a
    replica that had not yet seen the new keyset may wrap a new user's key under the old one meanwhile)."""
    total = 0
    while True:
        done = sealer.rewrap_batch(batch)
        total += done
        progress(done)
        if done == 0:
            if settle_s <= 0:
                return total
            time.sleep(settle_s)  # one more pass after replicas have re-read the keyset
            settle_s = 0.0


def rotate_user(factory: sessionmaker[Session], store: AdapterStore, sealer: Sealer, owner: OwnerRef) -> int:
    """A new data key for one user: their rows and adapter files re-sealed under it (rows in one transaction,
    so a concurrent append waits and its keyed hash matches), then the old key versions are destroyed."""
    new_version = sealer.rotate_user(owner.storage_key)
    with unit_of_work(factory) as session:
        done = history_repo.reseal(session, owner)
        versions = [row.version for row in adapter_repo.list_versions(session, owner.storage_key)]
    for version in versions:
        try:
            done += store.reseal_version(owner.storage_key, version, current=new_version)
        except (VersionNotFoundError, FileNotFoundError):
            pass  # pruned meanwhile
    sealer.drop_versions_below(owner.storage_key, new_version)
    return done
