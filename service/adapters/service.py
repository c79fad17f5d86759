"""Adapter use cases: publish (validated, atomic, versioned), current/versions, download, upload,
delete, rollback, and the serving key of a user's current adapter. Services never commit."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import IO, Any

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from service.accounts.repository import hold_for_sealed_write
from service.adapters import repository as repo
from service.adapters.archive import ArchiveError, pack_zip_to, unpack_upload
from service.adapters.peft_format import PEFT_FILES
from service.adapters.schemas import AdapterOut, AdapterVersionsOut
from service.adapters.store import AdapterStore, VersionExistsError, VersionNotFoundError
from service.adapters.validation import (
    AdapterValidationError,
    BaseModelSpec,
    ValidationLimits,
    validate_peft_files,
)
from service.db.models import SHARED_OWNER, Adapter
from service.db.session import after_commit, after_rollback
from service.engine.types import AdapterRef
from service.errors import Conflict, InsufficientStorage, NotFound, Unprocessable, is_storage_full
from service.notices import outbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterContext:
    """What adapter use cases need besides the session: the store and what adapters must fit."""

    store: AdapterStore
    spec: BaseModelSpec
    limits: ValidationLimits
    keep_versions: int
    # Tell every replica (pub/sub, this one included) that an owner's adapters changed or went: they drop
    # what they cache for it. Called after the commit; None where nobody serves (a worker, the eval).
    notify: Callable[[str, int | None], None] | None = None
    # OPPU_SHARED_ON_ERASE (flag | retire | retrain), and how to request a shared retrain in the caller's
    # transaction (None where no job can be requested).
    shared_on_erase: str = "flag"
    retrain_shared: Callable[[Session], object] | None = None


def to_out(row: Adapter, current_version: int | None) -> AdapterOut:
    return AdapterOut(
        version=row.version,
        current=row.version == current_version,
        sha256=row.sha256,
        rank=row.rank,
        alpha=row.alpha,
        target_modules=list(row.target_modules),
        base_model=row.base_model,
        source=row.source,
        shared_version=row.shared_version,
        nbytes=row.nbytes,
        metadata=row.meta,
        trained_on_erased=row.trained_on_erased,
        # SQLite keeps no offset: stored values are UTC, so a naive one is UTC (same as on PostgreSQL).
        created_at=row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC),
    )


def _ref(store: AdapterStore, row: Adapter) -> AdapterRef:
    directory = store.version_dir(row.owner_key, row.version)
    return AdapterRef(row.owner_key, row.version, row.sha256, directory, store.seal(row.owner_key))


def serving_ref(session: Session, store: AdapterStore, owner_key: str, spec: BaseModelSpec) -> AdapterRef | None:
    """The owner's current adapter, read from SQL on every request: once a new version is committed, no
    later request can be served the old one."""
    row = repo.current(session, owner_key)
    if row is None:
        return None
    if row.base_fingerprint != spec.fingerprint:
        raise Conflict(f"adapter v{row.version} was made for another base model than the one served")
    return _ref(store, row)


def shared_ref(session: Session, store: AdapterStore) -> AdapterRef | None:
    """The current shared task LoRA (None: none)."""
    row = repo.current(session, SHARED_OWNER)
    return _ref(store, row) if row is not None else None


def current_version(session: Session, owner_key: str) -> int | None:
    head = repo.head(session, owner_key)
    return head.current_version if head is not None else None


def publish(
    session: Session,
    ctx: AdapterContext,
    owner_key: str,
    user_pk: int | None,
    files: Mapping[str, bytes],
    *,
    source: str,
    shared_version: int | None = None,
    meta: dict[str, Any] | None = None,
    job_id: str | None = None,
    contributors: Iterable[str] = (),  # storage keys (never reused), not pks
) -> Adapter:
    """Validate, write the files, then record them as the current version (the SQL commit is the commit
    point: until then no reader sees the new version). The files are written and fsynced BEFORE the first
    SQL write, so the database's write lock (SQLite) is held only for a rename and a few rows."""
    limits = ctx.limits if owner_key == SHARED_OWNER else ctx.limits.for_user()
    try:
        checked = validate_peft_files(files, ctx.spec, limits)
    except AdapterValidationError as exc:  # the first problems, each cut short: never a body of megabytes
        raise Unprocessable(str(exc), details=exc.shown) from exc
    version = _write_version(session, ctx, owner_key, user_pk, files)
    row = repo.add(
        session,
        Adapter(
            owner_key=owner_key,
            user_pk=user_pk,
            version=version,
            sha256=checked.sha256,
            rank=checked.rank,
            alpha=checked.alpha,
            target_modules=list(checked.target_modules),
            base_model=ctx.spec.base_model_name,
            base_fingerprint=ctx.spec.fingerprint,
            nbytes=checked.nbytes,
            source=source,
            shared_version=shared_version,
            meta=meta,
            job_id=job_id,
            sealed=ctx.store.sealing,
        ),
    )
    repo.add_contributors(session, row.id, contributors)
    repo.set_current(session, owner_key, version)
    _prune(session, ctx, owner_key, current=version)
    outbox.record_adapter(session, owner_key, version)  # replicas that miss the pub/sub notice poll it
    after_commit(session, lambda: _notify(ctx, owner_key, version))  # replicas free the old versions early
    return row


def _write_version(
    session: Session, ctx: AdapterContext, owner_key: str, user_pk: int | None, files: Mapping[str, bytes]
) -> int:
    """Stage the files (fsynced, outside any lock), take the next version number (the SQL write lock starts
    here) and move the files into place; they are deleted again if the transaction rolls back."""
    staged = ctx.store.stage(files, owner_key)
    try:
        if user_pk is not None:  # a data-key rotation may have passed since the files were sealed
            hold_for_sealed_write(session, user_pk)
            if ctx.store.staged_is_stale(staged, owner_key):
                ctx.store.discard(staged)
                staged = ctx.store.stage(files, owner_key)  # under the newest version (rare: holds the lock)
        version = repo.allocate_version(session, owner_key, user_pk)
        try:
            ctx.store.commit_staged(staged, owner_key, version)
        except VersionExistsError:
            # A crashed earlier attempt left files for a number that was never committed: replace them.
            ctx.store.delete_version(owner_key, version)
            ctx.store.commit_staged(staged, owner_key, version)
    finally:
        ctx.store.discard(staged)

    def undo() -> None:  # the rows never came to be: their files must not linger
        ctx.store.delete_version(owner_key, version)

    after_rollback(session, undo)
    return version


def _prune(session: Session, ctx: AdapterContext, owner_key: str, *, current: int | None) -> None:
    """Keep the newest N versions (and always the current one); files go after the commit."""
    versions = [r.version for r in repo.list_versions(session, owner_key)]
    drop = [v for v in versions[ctx.keep_versions :] if v != current]
    if drop:
        repo.delete_versions(session, owner_key, drop)

        def delete_files() -> None:
            for v in drop:
                ctx.store.delete_version(owner_key, v)

        after_commit(session, delete_files)


def reconcile(session: Session, store: AdapterStore, older_than_s: float) -> dict[str, int]:
    """Bring the store and SQL back in line after crashes (start-up): temp dirs older than `older_than_s` go;
    version rows whose files are gone are deleted (a current one falls back to the newest kept version);
    version dirs that no row names and that are older than `older_than_s` (an in-flight publish of another
    process is younger) are removed."""
    removed_tmp = store.cleanup_tmp(older_than_s)
    rows = repo.all_versions(session)
    missing = [(owner, v, cur) for owner, v, cur in rows if not store.exists(owner, v)]
    for owner, version, current_version in missing:
        repo.delete_versions(session, owner, [version])
        if current_version == version:
            kept = [r.version for r in repo.list_versions(session, owner) if r.version != version]
            repo.set_current(session, owner, kept[0] if kept else None)
    known = {(owner, v) for owner, v, _ in rows}
    orphans = [(k, v) for k in [*store.list_storage_keys(), SHARED_OWNER] for v in store.list_versions(k)]
    orphans = [(k, v) for k, v in orphans if (k, v) not in known and store.age_s(k, v) > older_than_s]
    for owner, version in orphans:
        store.delete_version(owner, version)
    if missing:
        log.warning("reconcile: %d adapter version rows had no files and were removed", len(missing))
    return {"tmp": removed_tmp, "rows_without_files": len(missing), "orphan_dirs": len(orphans)}


def current(session: Session, owner_key: str) -> AdapterOut:
    row = repo.current(session, owner_key)
    if row is None:
        raise NotFound("no adapter for this user")
    out = to_out(row, row.version)
    out.stale = repo.is_current_stale(session, owner_key)  # a retrain is due
    return out


def stale_owners(session: Session, after_user_pk: int, limit: int) -> list[tuple[str, int]]:
    """(owner key, user pk) of users whose current adapter is stale: up to `limit`, by user pk past
    `after_user_pk` (a page: one request never makes a job per user of a whole deployment)."""
    rows = repo.stale_current(session, after_user_pk, limit)
    return [(row.owner_key, row.user_pk) for row in rows if row.user_pk is not None]


def versions(session: Session, owner_key: str) -> AdapterVersionsOut:
    head = repo.head(session, owner_key)
    cur = head.current_version if head is not None else None
    return AdapterVersionsOut(
        current_version=cur, versions=[to_out(r, cur) for r in repo.list_versions(session, owner_key)]
    )


def download(session: Session, ctx: AdapterContext, owner_key: str, version: int | None, out: IO[bytes]) -> int:
    """Writes the version's zip (the current one if None) to `out`, a temp file: streamed from disk in chunks,
    never whole in memory. Returns the version number."""
    row = repo.current(session, owner_key) if version is None else repo.get_version(session, owner_key, version)
    if row is None:
        raise NotFound("no such adapter version")
    try:
        with ctx.store.open_files(owner_key, row.version) as files:
            pack_zip_to(out, files)
    except VersionNotFoundError as exc:  # pruned by another replica just now, or lost: never a 500
        raise NotFound(f"the files of adapter version {row.version} are gone; list the versions again") from exc
    except OSError as exc:
        if is_storage_full(exc):
            raise InsufficientStorage("no disk space left to prepare the download; retry later") from exc
        raise
    return row.version


def upload(session: Session, ctx: AdapterContext, owner_key: str, user_pk: int, data: bytes | IO[bytes]) -> AdapterOut:
    try:
        # save_pretrained also writes a README.md: other plain files are checked, never read; PEFT files are
        # required.
        files = unpack_upload(data, max_total_bytes=ctx.limits.max_file_bytes + (1 << 20), keep=PEFT_FILES)
    except ArchiveError as exc:
        raise Unprocessable(f"invalid adapter archive: {exc}") from exc
    missing = sorted(PEFT_FILES - set(files))
    if missing:
        raise Unprocessable(f"invalid adapter archive: missing {', '.join(missing)}")
    try:
        row = publish(session, ctx, owner_key, user_pk, files, source="imported")
        session.flush()  # a write refused now is this request's 4xx/507, never a 500 at the commit
    except IntegrityError as exc:  # the user was erased while the upload arrived (their rows are gone)
        raise NotFound("this user no longer exists") from exc
    except (OSError, OperationalError) as exc:
        if is_storage_full(exc):  # nothing kept: staged files go, the transaction rolls back
            raise InsufficientStorage("no storage space left for the adapter; retry later") from exc
        raise
    return to_out(row, row.version)


def delete(session: Session, ctx: AdapterContext, owner_key: str) -> None:
    """The owner's versions deleted; after the commit, the files of exactly those versions go. Not the whole
    folder: a version published (a retrain, an upload) between this commit and that removal is the user's
    current adapter, and keeps its files."""
    versions = repo.delete_all(session, owner_key)
    if not versions:
        raise NotFound("no adapter for this user")
    outbox.record_adapter(session, owner_key, None)

    def forget_versions() -> None:
        ctx.store.delete_versions(owner_key, versions)
        _notify(ctx, owner_key, None)

    after_commit(session, forget_versions)


def _forget(ctx: AdapterContext, owner_key: str) -> None:
    ctx.store.delete_all(owner_key)
    _notify(ctx, owner_key, None)


def _notify(ctx: AdapterContext, owner_key: str, version: int | None) -> None:
    if ctx.notify is not None:
        ctx.notify(owner_key, version)


def forget_after_commit(session: Session, ctx: AdapterContext, owner_key: str) -> None:
    """Used when a user is erased: rows go by cascade, files and cache entries after the commit."""
    after_commit(session, lambda: _forget(ctx, owner_key))


def retire_shared_trained_on_erased(session: Session, ctx: AdapterContext) -> bool:
    """OPPU_SHARED_ON_ERASE, after a contributor's erasure (or a shared publish that found one erased): `flag`
    does nothing more. `retire` and `retrain`: if the CURRENT shared version is trained on an erased user, the
    newest kept version that is not becomes current (none if there is none), in this transaction (every request
    reads it from SQL) and on every replica's engine after the commit; `retrain` also requests a shared retrain
    (enqueued after the commit; an active shared job is reused). True if the current version was retired."""
    if ctx.shared_on_erase == "flag":
        return False
    current = repo.current_version(session, SHARED_OWNER, for_update=True)
    if current is None or not repo.is_trained_on_erased(session, SHARED_OWNER, current):
        return False
    clean = repo.newest_clean_version(session, SHARED_OWNER)
    repo.set_current(session, SHARED_OWNER, clean)
    outbox.record_adapter(session, SHARED_OWNER, clean)
    after_commit(session, lambda: _notify(ctx, SHARED_OWNER, clean))
    log.info("shared adapter v%d retired (trained on an erased user); now serving %s", current, clean)
    if ctx.shared_on_erase == "retrain" and ctx.retrain_shared is not None:
        ctx.retrain_shared(session)
    return True


def rollback(session: Session, owner_key: str, version: int) -> AdapterOut:
    row = repo.get_version(session, owner_key, version)
    if row is None:
        raise NotFound(f"adapter version {version} does not exist (kept versions only)")
    try:
        repo.ensure_head(session, owner_key, row.user_pk)
    except IntegrityError as exc:  # the user was erased after the read above (the head's insert meets no user)
        raise NotFound("this user no longer exists") from exc
    # Read again under the head's lock: a delete or a publish that pruned this version may have committed
    # between the read above and the lock (current would then name a version that is gone).
    session.expire(row)
    row = repo.get_version(session, owner_key, version)
    if row is None:
        raise NotFound(f"adapter version {version} does not exist (kept versions only)")
    repo.set_current(session, owner_key, version)
    return to_out(row, version)
