"""Job bodies: train a user's (or the shared) LoRA on a recorded history snapshot and publish it.

Idempotent: a job claims itself in SQL (queued -> running), and its publish is keyed by the job id,
so a retried or replayed job never creates a second version. Runs in an RQ work horse or in the
API process's in-process runner; the model is loaded lazily in the process that trains (CUDA is
never touched by the RQ parent).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.adapters import repository as adapter_repo
from service.adapters import service as adapter_service
from service.adapters.service import AdapterContext
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec, ValidationLimits
from service.config import Settings
from service.db.models import SHARED_OWNER, Job, User
from service.db.session import after_commit, unit_of_work
from service.history import repository as history_repo
from service.history.service import snapshot
from service.inference.loader import LoadedModel, load_model
from service.jobs import service as jobs
from service.jobs.queue import JobQueue
from service.training.examples import build_shared_examples, build_user_examples
from service.training.trainer import LoraTrainConfig, merge_lora_into, train_lora

log = logging.getLogger(__name__)
HEARTBEAT_EVERY_S = 2.0


@dataclass
class JobContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: AdapterStore
    queue: JobQueue
    _loaded: LoadedModel | None = None
    _spec: BaseModelSpec | None = None
    _shared_merged: int | None = None  # shared version merged into the training model
    _lock: threading.Lock = field(default_factory=threading.Lock)
    on_progress: Callable[[float], None] | None = None  # e.g. a progress bar for `oppu train`

    def base(self) -> tuple[LoadedModel, BaseModelSpec]:
        if self._loaded is None:
            self._loaded = load_model(self.settings)
            self._spec = BaseModelSpec.from_model(self._loaded.model, self._loaded.name)
        assert self._spec is not None
        return self._loaded, self._spec

    def adapter_context(self) -> AdapterContext:
        _, spec = self.base()
        return AdapterContext(
            store=self.store,
            spec=spec,
            limits=ValidationLimits.from_settings(self.settings),
            keep_versions=self.settings.adapter_keep_versions,
        )

    def training_model(self, shared_version: int | None) -> Any:
        """The base model with the given shared LoRA merged (user LoRAs train on top of it)."""
        loaded, _ = self.base()
        if shared_version != self._shared_merged:
            if self._shared_merged is not None:  # unmerging is lossy: reload the plain base instead
                self._loaded = None
                loaded, _ = self.base()
            if shared_version is not None:
                merge_lora_into(loaded.model, self.store.read_files(SHARED_OWNER, shared_version))
            self._shared_merged = shared_version
        return loaded.model


def run_job(ctx: JobContext, job_id: str) -> None:
    """Claim, train, publish, finish; on error retry (bounded) or fail. Safe to call twice."""
    with ctx._lock, unit_of_work(ctx.session_factory) as session:
        job = jobs.claim(session, job_id, ctx.settings.job_stale_after_s)
        if job is None:
            return  # done already, or running elsewhere with a live heartbeat
        kind, owner_key, user_pk, cutoff = job.kind, job.owner_key, job.user_pk, job.cutoff_item_id
        attempt = job.attempts
    try:
        with ctx._lock, _Heartbeat(ctx, job_id, attempt) as beat:
            version = _train_and_publish(ctx, job_id, kind, owner_key, user_pk, cutoff, beat)
        with unit_of_work(ctx.session_factory) as session:
            jobs.finish(session, job_id, adapter_version=version)
        ctx.queue.publish_adapter(owner_key, version)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        with unit_of_work(ctx.session_factory) as session:
            error = f"{type(exc).__name__}: {exc}"
            if jobs.fail_or_retry(session, job_id, error, ctx.settings.job_max_attempts, attempt=attempt):
                attempts = session.get(Job, job_id)
                n = attempts.attempts + 1 if attempts is not None else 1
                after_commit(session, lambda: ctx.queue.enqueue(job_id, n))


class _Heartbeat:
    """Refreshes the job's heartbeat (and progress) from a side thread for as long as this attempt works
    on it, model loading and example building included: the reaper must only retry jobs whose process
    died, never one that is slow to reach its first training step."""

    def __init__(self, ctx: JobContext, job_id: str, attempt: int) -> None:
        self._ctx, self._job_id, self._attempt = ctx, job_id, attempt
        self.progress = 0.0
        self._every = min(HEARTBEAT_EVERY_S, ctx.settings.job_stale_after_s / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oppu-job-heartbeat", daemon=True)

    def report(self, fraction: float) -> None:
        self.progress = min(0.99, fraction)
        if self._ctx.on_progress is not None:
            self._ctx.on_progress(fraction)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with unit_of_work(self._ctx.session_factory) as session:
                    jobs.heartbeat(session, self._job_id, self.progress, attempt=self._attempt)
            except Exception:
                log.exception("heartbeat of job %s failed", self._job_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _current_shared(session: Session) -> int | None:
    row = adapter_repo.current(session, SHARED_OWNER)
    return row.version if row is not None else None


def _train_and_publish(
    ctx: JobContext,
    job_id: str,
    kind: str,
    owner_key: str,
    user_pk: int | None,
    cutoff: int | None,
    beat: _Heartbeat,
) -> int:
    s = ctx.settings
    with unit_of_work(ctx.session_factory) as session:
        done = adapter_repo.by_job(session, job_id)
        if done is not None:  # published by an attempt that died before marking the job finished
            return done.version
        shared = _current_shared(session)
        if kind == "user_retrain":
            assert user_pk is not None
            items = [snapshot(i) for i in history_repo.all_items(session, user_pk, up_to_id=cutoff)]
            profile = history_repo.get_profile(session, user_pk) if s.train_use_profile else None
            examples = build_user_examples(
                items,
                k=s.train_retrieval_k,
                profile=profile.text if profile is not None else None,
                item_chars=s.retrieval_item_chars,
                profile_chars=s.profile_max_chars,
            )
            config = LoraTrainConfig(
                rank=s.train_user_rank,
                alpha=s.train_user_alpha,
                target_modules=tuple(s.train_user_target_modules),
                lr=s.train_user_lr,
                epochs=s.train_user_epochs,
                batch_size=s.train_batch_size,
                max_seq_len=s.train_max_seq_len,
                seed=s.train_seed,
            )
            base_shared = shared
        else:
            users = session.execute(select(User.id, User.storage_key)).all()
            per_user = {key: [snapshot(i) for i in history_repo.all_items(session, pk)] for pk, key in users}
            examples = build_shared_examples(
                {k: v for k, v in per_user.items() if v},
                k=s.train_retrieval_k,
                max_per_user=s.train_shared_max_per_user,
                seed=s.train_seed,
                item_chars=s.retrieval_item_chars,
                profile_chars=s.profile_max_chars,
            )
            default = LoraTrainConfig.shared_default()
            config = LoraTrainConfig(
                rank=default.rank,
                alpha=default.alpha,
                dropout=default.dropout,
                target_modules=default.target_modules,
                lr=s.train_shared_lr,
                epochs=s.train_shared_epochs,
                batch_size=s.train_batch_size,
                max_seq_len=s.train_max_seq_len,
                seed=s.train_seed,
            )
            base_shared = None  # the shared LoRA is trained on the plain base
    if not examples:
        raise ValueError("no history to train on")
    model = ctx.training_model(base_shared)
    loaded, _ = ctx.base()
    out = train_lora(
        model,
        loaded.tokenizer,
        examples,
        config,
        base_model_name=loaded.name,
        progress=beat.report,
    )
    meta = {
        "job_id": job_id,
        "cutoff_item_id": cutoff,
        "examples": out.examples,
        "steps": out.steps,
        "final_loss": out.final_loss,
        "train_seconds": round(out.seconds, 2),
        "epochs": config.epochs,
        "lr": config.lr,
        "retrieval_k": s.train_retrieval_k,
    }
    with unit_of_work(ctx.session_factory) as session:
        done = adapter_repo.by_job(session, job_id)
        if done is not None:
            return done.version
        row = adapter_service.publish(
            session,
            ctx.adapter_context(),
            owner_key,
            user_pk,
            out.files,
            source="trained",
            shared_version=base_shared,
            meta=meta,
            job_id=job_id,
        )
        return row.version


def reap_stale(ctx: JobContext) -> int:
    """Re-enqueue (or fail, past max attempts) running jobs whose worker stopped heart-beating."""
    n = 0
    with unit_of_work(ctx.session_factory) as session:
        for job in jobs.stale_running(session, ctx.settings.job_stale_after_s):
            job_id, attempts = job.id, job.attempts
            if attempts < ctx.settings.job_max_attempts:
                after_commit(session, _enqueue_later(ctx.queue, job_id, attempts + 1))
            else:
                jobs.fail_or_retry(session, job_id, "worker died too many times", ctx.settings.job_max_attempts)
            n += 1
    return n


def _enqueue_later(queue: JobQueue, job_id: str, attempt: int) -> Callable[[], None]:
    return lambda: queue.enqueue(job_id, attempt)


_worker_ctx: JobContext | None = None


def run_job_in_worker(job_id: str) -> None:
    """RQ entry point (runs in the work horse)."""
    global _worker_ctx
    if _worker_ctx is None:
        from service.config import get_settings
        from service.db.session import make_engine, make_session_factory
        from service.jobs.queue import make_queue

        settings = get_settings()
        _worker_ctx = JobContext(
            settings=settings,
            session_factory=make_session_factory(make_engine(settings.resolved_database_url)),
            store=AdapterStore(settings.adapters_dir),
            queue=make_queue(settings, None),
        )
    run_job(_worker_ctx, job_id)


def recover_in_process(ctx: JobContext) -> int:
    """Embedded mode (one process): jobs left queued/running by a previous run are re-queued."""
    with unit_of_work(ctx.session_factory) as session:
        active = list(session.scalars(select(Job).where(Job.status.in_(("queued", "running")))))
        for job in active:
            job.status = "queued"
            after_commit(session, _enqueue_later(ctx.queue, job.id, job.attempts + 1))
    return len(active)
