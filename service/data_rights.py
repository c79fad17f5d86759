"""A user's data rights: export everything we hold about them as one archive, and erase it all
(rows, adapter files, cache entries, queued jobs). Services never commit."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO

from sqlalchemy.orm import Session

from service.accounts import repository as account_repo
from service.adapters import repository as adapter_repo
from service.adapters import service as adapter_service
from service.adapters.archive import add_files
from service.adapters.service import AdapterContext
from service.adapters.store import VersionNotFoundError
from service.db.session import after_commit
from service.errors import Unauthorized
from service.history import repository as history_repo
from service.history.service import as_utc
from service.jobs import repository as job_repo
from service.sealing.session import sealer_of
from service.tenancy import UserRef
from service.users import delete_user_rows, revoke_keys


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


JOB_FIELDS = ("job_id", "kind", "status", "adapter_version", "error", "created_at", "finished_at")


def _write_keys_and_jobs(session: Session, user: UserRef, zf: zipfile.ZipFile) -> tuple[int, int]:
    """keys.json (metadata only: the key is never stored, its hash stays with us) and jobs.json, a JSON array
    written a row at a time (an owner may have many); returns how many of each."""
    keys: list[object] = [
        {"prefix": k.prefix, "created_at": _iso(k.created_at), "revoked_at": _iso(k.revoked_at)}
        for k in account_repo.keys_of(session, user.pk)
    ]
    zf.writestr("keys.json", json.dumps(keys, indent=2))
    jobs = 0
    with zf.open("jobs.json", "w") as fh:
        fh.write(b"[")
        for row in job_repo.iter_of_owner(session, user.storage_key):
            values = [_iso(v) if isinstance(v, datetime) else v for v in row]
            fh.write(
                (",\n " if jobs else "\n ").encode() + json.dumps(dict(zip(JOB_FIELDS, values, strict=True))).encode()
            )
            jobs += 1
        fh.write(b"\n]\n")
    return len(keys), jobs


def export_archive(session: Session, ctx: AdapterContext, user: UserRef, out: IO[bytes]) -> None:
    """Writes the zip to `out` (a temp file: never the whole archive in memory): manifest.json,
    history.jsonl, profile.json, keys.json (key prefixes and dates), jobs.json (training jobs),
    adapters/v<N>/{PEFT files} for kept versions."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        lines = 0
        with zf.open("history.jsonl", "w") as fh:
            for item in history_repo.iter_items(session, user):
                record = {
                    "id": item.client_id,
                    "input": item.input,
                    "output": item.output,
                    "kind": item.kind,
                    "metadata": item.meta,
                    "timestamp": _iso(item.timestamp),
                    "created_at": _iso(item.created_at),
                }
                fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                lines += 1
        profile = history_repo.get_profile(session, user)
        if profile is not None:
            zf.writestr(
                "profile.json",
                json.dumps({"text": profile.text, "source": profile.source, "updated_at": _iso(profile.updated_at)}),
            )
        versions = []
        for row in adapter_repo.list_versions(session, user.storage_key):
            entry: dict[str, object] = {"version": row.version, "sha256": row.sha256, "source": row.source}
            try:
                # Through the store's readers: the files as they are served and downloaded (opened if sealed at
                # rest), streamed in chunks.
                with ctx.store.open_files(user.storage_key, row.version) as files:
                    add_files(zf, files, f"adapters/v{row.version}")
            except VersionNotFoundError:  # pruned by another replica meanwhile: listed, files noted as gone
                entry["files_missing"] = True
            versions.append(entry)
        keys, jobs = _write_keys_and_jobs(session, user, zf)
        manifest = {
            "user_id": user.user_id,
            "exported_at": datetime.now(UTC).isoformat(),
            "history_items": lines,
            "has_profile": profile is not None,
            "adapter_versions": versions,
            "api_keys": keys,
            "training_jobs": jobs,
        }
        zf.writestr("manifest.json", json.dumps(manifest, indent=2))


class UserErased(Unauthorized):
    """What a request of a user erased meanwhile hears: their rows were cancelled."""

    code = "user_erased"


@dataclass(frozen=True)
class EraseHooks:
    """What an erase ends outside SQL, right after the commit (the API wires them from its state)."""

    revoke: Callable[[list[str]], None]  # the user's key hashes: streams end here first, then on every replica
    erased: Callable[[str], None]  # the storage key: the tenant's engine rows end here first, then on every replica
    checkpoint: Callable[[], object]  # SQLite: the erased rows leave the WAL file


def erase_user(session: Session, ctx: AdapterContext, user: UserRef, hooks: EraseHooks | None = None) -> None:
    """Final at once. Rows go now (history, profile, keys, adapters, jobs: ON DELETE CASCADE). After the commit:
    the user's keys are revoked like a rotation (their streams end, here and on every replica), their queued and
    running engine rows are cancelled, the adapter files go and every replica's caches on the notice that
    follows, and (SQLite) a checkpoint truncates the WAL. A running retrain finds its job row gone and publishes
    nothing. Shared adapter versions trained on their history are flagged `trained_on_erased`; a flagged
    current one is retired (or retired and retrained) as OPPU_SHARED_ON_ERASE says."""
    # Crypto-shredding first: once the user's data key is gone, no copy of their data opens again (backups,
    # a replica's disk), even if this transaction then fails; the rows go next.
    sealer_of(session).shred(user.storage_key)
    revoke_keys(session, user, hooks.revoke if hooks is not None else None)
    delete_user_rows(session, user)
    # After the delete: on PostgreSQL a shared job publishing now holds the user row (FOR SHARE), so this flag
    # runs after that job committed and sees its contributor rows.
    adapter_repo.flag_trained_on(session, user.storage_key)
    adapter_service.retire_shared_trained_on_erased(session, ctx)  # as OPPU_SHARED_ON_ERASE says
    if hooks is not None:
        after_commit(session, lambda: hooks.erased(user.storage_key))
    adapter_service.forget_after_commit(session, ctx, user.storage_key)
    if hooks is not None:
        after_commit(session, lambda: _checkpoint(hooks))


def _checkpoint(hooks: EraseHooks) -> None:
    hooks.checkpoint()
