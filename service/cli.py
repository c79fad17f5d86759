"""`oppu` command line: serve | migrate | create-user | worker | train."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy.engine import make_url

from service.config import LOOPBACK_HOSTS, Settings, describe_invalid, get_settings
from service.db.migrate import NotMigrated
from service.errors import ServiceError

log = logging.getLogger("oppu")

if TYPE_CHECKING:
    from service.adapters.store import AdapterStore
    from service.db.session import Database
    from service.sealing.operations import OldBytes
    from service.sealing.service import Sealer


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def cmd_migrate(_: argparse.Namespace) -> int:
    from service.db.migrate import upgrade

    upgrade(get_settings().resolved_database_url)
    print("database is at the latest migration")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.composition import ensure_admin_key
    from service.db.migrate import upgrade
    from service.main import create_app

    settings = get_settings()
    if _is_sqlite(settings.resolved_database_url) or args.migrate:
        upgrade(settings.resolved_database_url)  # embedded default: one command gives a working server
    settings = ensure_admin_key(settings)
    _warn_if_metrics_open(settings, args.host)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # No connection cap here: uvicorn's counts idle connections (see middleware.InFlightLimit, which caps
        # requests instead). Idle sockets are then bounded by the process's file limit; put a proxy with a
        # header timeout in front of a public port (deploy/: nginx).
        limit_concurrency=None,
        proxy_headers=False,  # the app applies OPPU_FORWARDED_ALLOW_IPS itself (create_app), once
    )
    return 0


def _warn_if_metrics_open(settings: Settings, host: str) -> None:
    """`/metrics` names users (the vllm:lora_* series a field router reads): on a port others can reach, say
    so when no token guards it (deploy/ keeps it behind nginx or a token; a bare `--host 0.0.0.0` does not)."""
    token = settings.metrics_token
    if host.lower().strip("[]") not in LOOPBACK_HOSTS and (token is None or not token.get_secret_value()):
        log.warning(
            "GET /metrics is open to anyone reaching %s: its series name users (user:<id>); set OPPU_METRICS_TOKEN",
            host,
        )


def cmd_create_user(args: argparse.Namespace) -> int:
    from service import users
    from service.composition import database
    from service.db.session import unit_of_work

    db = database(get_settings())
    with unit_of_work(db.session_factory) as session:
        user, key = users.create_user(session, args.user_id)
        code = users.issue_recovery_code(session, user)  # the owner's re-auth for rotating their own key
    print(f"user_id={user.user_id}\napi_key={key}\nrecovery_code={code}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.composition import worker_job_context
    from service.jobs.worker import run_worker

    if not get_settings().redis_url:
        raise SystemExit("oppu worker needs OPPU_REDIS_URL (the embedded default runs jobs in the API)")
    run_worker(get_settings(), worker_job_context(reconcile_store=True), burst=args.burst)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.accounts import repository as accounts
    from service.composition import database, job_context
    from service.db.models import SHARED_OWNER
    from service.db.session import unit_of_work
    from service.jobs import service as jobs
    from service.jobs.queue import NoQueue
    from service.jobs.tasks import run_job

    settings = get_settings()
    db = database(settings)
    ctx = job_context(settings, NoQueue(), db)
    with unit_of_work(db.session_factory) as session:
        if args.shared:
            out, _ = jobs.request_job(session, ctx.queue, "shared_retrain", SHARED_OWNER, None)
        else:
            user = accounts.by_user_id(session, args.user)
            if user is None:
                print(f"no such user: {args.user}", file=sys.stderr)
                return 2
            out, _ = jobs.request_job(
                session, ctx.queue, "user_retrain", user.storage_key, user.id, require_history=True
            )
    job_id = out.job_id
    print(f"job {job_id}: training in the foreground")
    with tqdm(total=100, unit="%", desc="training") as bar:

        def advance(fraction: float) -> None:
            bar.update(round(fraction * 100) - bar.n)

        ctx.on_progress = advance
        run_job(ctx, job_id)
    with unit_of_work(db.session_factory) as session:
        job = jobs.get(session, job_id)
        print(f"job {job.job_id}: {job.status} adapter_version={job.adapter_version} {job.error or ''}".strip())
        return 0 if job.status == "succeeded" else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from service.evaluation.protocol import parse_settings, preset_config
    from service.evaluation.report import write_report
    from service.evaluation.runner import run_eval

    options = {
        "users": args.users,
        "history_items": args.items,
        "test_items": args.test_items,
        "epochs": args.epochs,
        "seed": args.seed,
        "model": args.model,
        "split": args.split,
    }
    try:
        overrides = {**parse_settings(args.set), **{k: v for k, v in options.items() if v is not None}}
        config = preset_config(args.preset, progress=True, **overrides)
    except (ValueError, TypeError) as exc:  # an unknown --set field or a value of the wrong kind
        print(f"oppu eval: {exc}", file=sys.stderr)
        return 2
    if args.data is not None and not Path(args.data).is_dir():
        print(f"oppu eval: --data {args.data} is not a folder (MovieLens latest-small)", file=sys.stderr)
        return 2
    run_dir = args.out + ".run"  # per-user results land here as they finish; --resume continues from it
    report = run_eval(config, data_dir=args.data, settings=get_settings(), run_dir=run_dir, resume=args.resume)
    write_report(report, args.out)
    print(report["table_markdown"])
    print(f"wrote {args.out} in {report['timing']['total_s']:.0f} s")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Encryption at rest, for the operator: status, master-key rotation, sealing an existing deployment,
    one user's data-key rotation. Each is resumable: run it again after an interruption."""
    from service.adapters.store import AdapterStore
    from service.composition import database, sealer

    if args.keys_command == "rotate-master":
        return _rotate_master(args)
    settings = get_settings()
    seals = sealer(settings)
    db = database(settings, seals)
    try:
        store = AdapterStore(settings.adapters_dir, seals)
        commands = {"status": _keys_status, "seal-existing": _seal_existing, "rotate-user": _rotate_user}
        return commands[args.keys_command](args, db, store, seals)
    finally:  # no connection left to the garbage collector
        db.dispose()
        seals.close()


# Exit status of `oppu keys seal-existing` / `rotate-master` when the work is done but a SQLite checkpoint was
# blocked by another connection reading: the database's files may still hold the old bytes (README).
OLD_BYTES_LEFT = 3


def _keys_status(_: argparse.Namespace, db: Database, _store: AdapterStore, seals: Sealer) -> int:
    import json

    from service.db.session import unit_of_work
    from service.sealing import operations

    with unit_of_work(db.session_factory) as session:
        plaintext = operations.plaintext_counts(session)
    print(json.dumps({**seals.status(), "plaintext": plaintext}, indent=2))
    return 0


def _seal_existing(_: argparse.Namespace, db: Database, store: AdapterStore, _seals: Sealer) -> int:
    from tqdm import tqdm

    from service.db.session import unit_of_work
    from service.sealing import operations

    with unit_of_work(db.session_factory) as session:
        todo = sum(operations.plaintext_counts(session).values())
    with tqdm(total=todo, unit="row", desc="sealing") as bar:
        done = operations.seal_existing(db.session_factory, store, progress=bar.update)
    said = f"sealed {done.count} rows and adapter versions"
    if done.old_bytes == "gone":
        print(f"{said}; nothing is left in plaintext")
        return 0
    if done.old_bytes == "until_vacuum":
        print(
            f"{said}; no live row holds plaintext, but PostgreSQL keeps the old row versions in its files until "
            "VACUUM reclaims them: run `VACUUM FULL history_items, profiles;` on the database (README)"
        )
        return 0
    print(
        f"oppu keys seal-existing: {said}, but the database's files may still hold their plaintext: its SQLite "
        "checkpoint was blocked by another connection reading (a running server?); run `oppu keys seal-existing` "
        f"again when it is idle (exit status {OLD_BYTES_LEFT})",
        file=sys.stderr,
    )
    return OLD_BYTES_LEFT


def _rotate_user(args: argparse.Namespace, db: Database, store: AdapterStore, seals: Sealer) -> int:
    """The background rotation (`user_key_rotation`), run here in the foreground as a job of its own: it takes the
    owner's one-active-job guard, so it never runs beside a rotation or retrain of the user under way elsewhere
    (the two fought: one re-sealed what the other had just re-sealed, until RotationStalled), and a replica asked
    for a rotation meanwhile answers with this job."""
    from service.accounts import repository as accounts
    from service.composition import job_context
    from service.db.session import unit_of_work
    from service.jobs import service as jobs
    from service.jobs.queue import NoQueue, make_queue
    from service.jobs.tasks import run_job
    from service.sealing import operations

    if not seals.enabled:
        print("sealing is off (OPPU_SEAL_AT_REST=false): no data key to rotate", file=sys.stderr)
        return 2
    with unit_of_work(db.session_factory) as session:
        user = accounts.by_user_id(session, args.user_id)
        if user is None:
            print(f"no such user: {args.user_id}", file=sys.stderr)
            return 2
        # Not enqueued (NoQueue): this process claims it next. Another kind of job active: OtherJobActive (409).
        job, created = jobs.request_job(session, NoQueue(), jobs.KEY_ROTATION, user.storage_key, user.id)
    if not created:
        print(
            f"oppu: a data-key rotation of {args.user_id} is already under way (job {job.job_id}, {job.status}); "
            f"not started again: follow it at GET /admin/jobs/{job.job_id}",
            file=sys.stderr,
        )
        return 2
    settings = get_settings()
    queue = make_queue(settings) if settings.redis_url else NoQueue()  # replicas' notices; a retry for a worker
    settle_s = operations.settle_seconds(settings.key_recheck_s)
    print(f"{args.user_id}: new data key (job {job.job_id}); waiting {settle_s:.1f} s for every process to use it")
    try:
        run_job(job_context(settings, queue, db, store), job.job_id)
    finally:
        queue.close()
    return _rotation_outcome(args.user_id, db, job.job_id)


def _rotation_outcome(user_id: str, db: Database, job_id: str) -> int:
    from service.db.session import unit_of_work
    from service.errors import NotFound
    from service.jobs import service as jobs

    with unit_of_work(db.session_factory) as session:
        try:
            out = jobs.get(session, job_id)
        except NotFound:  # the job's row went with its owner
            print(f"oppu: {user_id} was erased meanwhile: no data key left to rotate", file=sys.stderr)
            return 1
    if out.status == "succeeded":
        print(f"{user_id}: rows and files re-sealed under the new data key; the old key is destroyed")
        return 0
    again = " (queued again: the server's job runner or a worker retries it)" if out.status == "queued" else ""
    print(
        f"oppu: the rotation of {user_id} did not finish: job {job_id} is {out.status}{again}: {out.error or ''}",
        file=sys.stderr,
    )
    return 1


def _rotate_master(args: argparse.Namespace) -> int:
    """A new primary KEK in the keyset file (old ones kept), every data key re-wrapped under it, the keyring
    checkpointed, then (--retire-old) the keys no data key uses leave the file. Running replicas re-read the file
    when it changes."""
    from tqdm import tqdm

    from service.composition import sealer
    from service.sealing import operations
    from service.sealing.kek import LocalKeyset, write_keyset

    settings = get_settings()
    if settings.master_key is not None:
        print("rotate-master needs OPPU_MASTER_KEY_FILE (an inline OPPU_MASTER_KEY is not rewritten)", file=sys.stderr)
        return 2
    path = settings.resolved_master_key_file
    keyset = LocalKeyset(path=path).keyset()
    before = sealer(settings)
    try:
        in_use = set(before.kek_counts())
    finally:
        before.close()
    if not args.resume and in_use <= {keyset.primary}:
        keyset = keyset.with_new_primary()
        write_keyset(path, keyset)
        print(f"new primary master key {keyset.primary} written to {path}; old keys kept until --retire-old")
    seals = sealer(settings)  # reads the file again: wraps under the new primary
    try:
        with tqdm(unit="key", desc="re-wrapping") as bar:
            done = operations.rotate_master(seals, progress=bar.update, settle_s=args.settle_s)
        print(f"re-wrapped {done.count} data keys under {keyset.primary}")
        if args.retire_old:
            retired = set(keyset.keys) - set(seals.kek_counts()) - {keyset.primary}
            write_keyset(path, keyset.without(retired))
            print(f"retired master keys: {sorted(retired) or 'none'}")
    finally:
        seals.close()
    return _old_wrappings(done.old_bytes, "--resume --retire-old" if args.retire_old else "--resume")


def _old_wrappings(old_bytes: OldBytes, again: str) -> int:
    """What rotate-master says of the data keys' old wrappings left in the keyring's files."""
    if old_bytes == "until_vacuum":
        print(
            "the keyring is PostgreSQL: the data keys' old wrappings stay in its files as dead row versions until "
            "VACUUM reclaims them: run `VACUUM FULL data_keys;` on the keyring database (README)"
        )
    elif old_bytes == "until_checkpoint":
        print(
            "oppu keys rotate-master: the keyring's files may still hold data keys wrapped under the old master "
            "key(s): its SQLite checkpoint was blocked by another connection reading (a running server?); run "
            f"`oppu keys rotate-master {again}` again when it is idle (exit status {OLD_BYTES_LEFT})",
            file=sys.stderr,
        )
        return OLD_BYTES_LEFT
    return 0


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oppu", description="Personal LLM server (one PEFT per user)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    levels = ["critical", "error", "warning", "info", "debug", "trace"]  # uvicorn's
    serve.add_argument("--log-level", default="info", choices=levels)
    serve.add_argument("--migrate", action="store_true", help="run migrations first (always on SQLite)")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="upgrade the database to the latest schema").set_defaults(func=cmd_migrate)
    create = sub.add_parser("create-user", help="create a user and print its API key")
    create.add_argument("user_id")
    create.set_defaults(func=cmd_create_user)
    worker = sub.add_parser("worker", help="run an RQ training worker (needs OPPU_REDIS_URL)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=cmd_worker)
    train = sub.add_parser("train", help="train an adapter in the foreground")
    target = train.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", help="user id")
    target.add_argument("--shared", action="store_true", help="the shared task LoRA")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="personalization evaluation: every method on the same test items")
    ev.add_argument("dataset", choices=["movielens"])
    ev.add_argument("--preset", choices=["small", "full", "activity", "large"], default="small")
    ev.add_argument("--resume", action="store_true", help="continue the interrupted run kept in OUT.run/")
    ev.add_argument("--out", required=True, help="the JSON report")
    ev.add_argument("--data", help="MovieLens latest-small folder (default: ../shared/data/movielens-latest-small)")
    ev.add_argument("--users", type=int, help="test users")
    ev.add_argument("--items", "--history-items", dest="items", type=int, help="history items per user (activity)")
    ev.add_argument("--test-items", type=int, help="test items per user (its last ratings)")
    ev.add_argument("--epochs", type=int, help="epochs of both training stages")
    ev.add_argument("--seed", type=int)
    ev.add_argument("--model", help="base model (default: OPPU_MODEL)")
    ev.add_argument(
        "--split",
        choices=["test", "dev"],
        help="dev: score the ratings just before each user's test items (for choosing settings); default test",
    )
    ev.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="any EvalConfig field, e.g. user_lr=3e-3"
    )
    ev.set_defaults(func=cmd_eval)
    _add_keys_parser(sub)
    return parser


def _add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="encryption at rest: status, rotate-master, seal-existing, rotate-user")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("status", help="users sealed, master keys in use, what is still plaintext")
    rotate = keys_sub.add_parser("rotate-master", help="new master key; re-wrap every data key online")
    rotate.add_argument("--resume", action="store_true", help="finish an interrupted rotation (no new key)")
    rotate.add_argument("--retire-old", action="store_true", help="then drop master keys no data key uses")
    rotate.add_argument(
        "--settle-s", type=_non_negative, default=5.0, help="wait, then one more pass (running replicas)"
    )
    keys_sub.add_parser("seal-existing", help="seal a plaintext deployment in place (resumable)")
    rotate_user = keys_sub.add_parser("rotate-user", help="a new data key for one user; re-seal their data")
    rotate_user.add_argument("user_id")
    keys.set_defaults(func=cmd_keys)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ValidationError as exc:
        if exc.title != Settings.__name__:  # only the environment's settings are the operator's input here
            raise
        print(describe_invalid(exc), file=sys.stderr)
        return 2
    except SettingsError as exc:  # a value the environment source cannot parse (a list not in JSON form)
        print(f'invalid settings: {exc} (list settings are JSON: \'["q_proj", "v_proj"]\')', file=sys.stderr)
        return 2
    except ServiceError as exc:  # the operator's input refused as an API client's would be (a user that exists)
        print(f"oppu: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except NotMigrated as exc:
        print(f"oppu: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
