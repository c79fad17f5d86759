"""`oppu` command line: serve | migrate | create-user | worker | train."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sqlalchemy.engine import make_url

from service.config import get_settings


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
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        limit_concurrency=settings.max_concurrency,
        proxy_headers=False,  # the app applies OPPU_FORWARDED_ALLOW_IPS itself (create_app), once
    )
    return 0


def cmd_create_user(args: argparse.Namespace) -> int:
    from service import users
    from service.composition import database
    from service.db.session import unit_of_work

    db = database(get_settings())
    with unit_of_work(db.session_factory) as session:
        user, key = users.create_user(session, args.user_id)
    print(f"user_id={user.user_id}\napi_key={key}")
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
            out, _ = jobs.request_job(session, ctx.queue, "user_retrain", user.storage_key, user.id)
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
    overrides = {**parse_settings(args.set), **{k: v for k, v in options.items() if v is not None}}
    config = preset_config(args.preset, progress=True, **overrides)
    run_dir = args.out + ".run"  # per-user results land here as they finish; --resume continues from it
    report = run_eval(config, data_dir=args.data, settings=get_settings(), run_dir=run_dir, resume=args.resume)
    write_report(report, args.out)
    print(report["table_markdown"])
    print(f"wrote {args.out} in {report['timing']['total_s']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oppu", description="Personal LLM server (one PEFT per user)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
