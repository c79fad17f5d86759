"""Job bodies: train a user's (or the shared) LoRA on a recorded history snapshot and publish it.

Idempotent: a job claims itself in SQL (queued -> running), and its publish is keyed by the job id,
so a retried or replayed job never creates a second version. Runs in an RQ work horse or in the
API process's in-process runner; the model is loaded lazily in the process that trains (CUDA is
never touched by the RQ parent). One body per job kind (`PLANNERS`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.accounts import repository as account_repo
from service.adapters import repository as adapter_repo
from service.adapters import service as adapter_service
from service.adapters.peft_format import merge_lora, read_adapter_dir, unmerge
from service.adapters.service import AdapterContext
from service.adapters.store import AdapterStore
from service.adapters.validation import BaseModelSpec, ValidationLimits
from service.config import Settings
from service.db.session import after_commit, unit_of_work
from service.engine.types import AdapterRef
from service.errors import safe_error_text
from service.history import repository as history_repo
from service.history.service import snapshot
from service.inference.loader import LoadedModel, load_model
from service.jobs import repository as job_repo
from service.jobs import service as jobs
from service.jobs.queue import JobQueue
from service.training.examples import TrainExample, build_shared_examples, build_user_examples
from service.training.trainer import LoraTrainConfig, TrainOutput, train_lora

log = logging.getLogger(__name__)
HEARTBEAT_EVERY_S = 2.0


@dataclass
class JobContext:
    """What job bodies need; built by the composition root (API process, worker, `oppu train`)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: AdapterStore
    queue: JobQueue
    on_progress: Callable[[float], None] | None = None  # e.g. a progress bar for `oppu train`
    _loaded: LoadedModel | None = None
    _spec: BaseModelSpec | None = None
    _shared: AdapterRef | None = None  # the shared version merged into the training model
    _shared_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

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

    def training_model(self, shared: AdapterRef | None) -> Any:
        """The base model with the given shared LoRA merged (user LoRAs train on top of it)."""
        loaded, _ = self.base()
        if shared != self._shared:
            unmerge(loaded.model, self._shared_originals)
            self._shared_originals = {}
            if shared is not None:
                weights = read_adapter_dir(shared.directory, max_scale=self.settings.adapter_max_scale)
                self._shared_originals = merge_lora(loaded.model, weights)
            self._shared = shared
        return loaded.model


@dataclass(frozen=True)
class ClaimedJob:
    job_id: str
    kind: str
    owner_key: str
    user_pk: int | None
    cutoff: int | None
    attempt: int


@dataclass(frozen=True)
class TrainingPlan:
    """What one job trains: the examples, the LoRA config, and the shared LoRA it trains on top of."""

    examples: list[TrainExample]
    config: LoraTrainConfig
    base_shared: AdapterRef | None
    contributors: tuple[int, ...] = ()  # users whose history is in the examples (for erasure)


def run_job(ctx: JobContext, job_id: str) -> None:
    """Claim, train, publish, finish; on error retry (bounded) or fail. Safe to call twice."""
    with ctx._lock, unit_of_work(ctx.session_factory) as session:
        row = jobs.claim(session, job_id, ctx.settings.job_stale_after_s)
        if row is None:
            return  # done already, or running elsewhere with a live heartbeat
        job = ClaimedJob(row.id, row.kind, row.owner_key, row.user_pk, row.cutoff_item_id, row.attempts)
    try:
        with ctx._lock, _Heartbeat(ctx, job_id, job.attempt) as beat:
            version = _train_and_publish(ctx, job, beat)
        with unit_of_work(ctx.session_factory) as session:
            jobs.finish(session, job_id, adapter_version=version)
        ctx.queue.publish_adapter(job.owner_key, version)
    except Exception as exc:
        log.error("job %s failed: %s", job_id, safe_error_text(exc))
        _fail_or_retry(ctx, job, exc)


def _fail_or_retry(ctx: JobContext, job: ClaimedJob, exc: Exception) -> None:
    with unit_of_work(ctx.session_factory) as session:
        error = safe_error_text(exc)
        if jobs.fail_or_retry(session, job.job_id, error, ctx.settings.job_max_attempts, attempt=job.attempt):
            after_commit(session, _enqueue_later(ctx.queue, job.job_id, job.attempt + 1))


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


def _user_plan(ctx: JobContext, session: Session, job: ClaimedJob) -> TrainingPlan:
    """Stage 2: one user's history up to the job's cutoff, on top of the current shared LoRA."""
    s = ctx.settings
    assert job.user_pk is not None
    items = [snapshot(i) for i in history_repo.all_items(session, job.user_pk, up_to_id=job.cutoff)]
    profile = history_repo.get_profile(session, job.user_pk) if s.train_use_profile else None
    examples = build_user_examples(
        items,
        k=s.train_retrieval_k,
        profile=profile.text if profile is not None else None,
        item_chars=s.retrieval_item_chars,
        profile_chars=s.profile_max_chars,
    )
    config = LoraTrainConfig.from_settings(s, stage="user")
    return TrainingPlan(examples, config, adapter_service.shared_ref(session, ctx.store))


def _shared_plan(ctx: JobContext, session: Session, job: ClaimedJob) -> TrainingPlan:
    """Stage 1: a sample of every user's history, on the plain base model."""
    s = ctx.settings
    users = account_repo.all_user_keys(session)
    per_user = {key: [snapshot(i) for i in history_repo.all_items(session, pk)] for pk, key in users}
    examples = build_shared_examples(
        {k: v for k, v in per_user.items() if v},
        k=s.train_retrieval_k,
        max_per_user=s.train_shared_max_per_user,
        seed=s.train_seed,
        item_chars=s.retrieval_item_chars,
        profile_chars=s.profile_max_chars,
    )
    contributors = tuple(pk for pk, key in users if per_user[key])
    return TrainingPlan(examples, LoraTrainConfig.from_settings(s, stage="shared"), None, contributors)


PLANNERS: dict[str, Callable[[JobContext, Session, ClaimedJob], TrainingPlan]] = {
    "user_retrain": _user_plan,
    "shared_retrain": _shared_plan,
}


def _train_and_publish(ctx: JobContext, job: ClaimedJob, beat: _Heartbeat) -> int:
    with unit_of_work(ctx.session_factory) as session:
        done = adapter_repo.by_job(session, job.job_id)
        if done is not None:  # published by an attempt that died before marking the job finished
            return done.version
        plan = PLANNERS[job.kind](ctx, session, job)
    if not plan.examples:
        raise ValueError("no history to train on")
    model = ctx.training_model(plan.base_shared)
    loaded, _ = ctx.base()
    out = train_lora(
        model, loaded.tokenizer, plan.examples, plan.config, base_model_name=loaded.name, progress=beat.report
    )
    return _publish(ctx, job, plan, out)


def _publish(ctx: JobContext, job: ClaimedJob, plan: TrainingPlan, out: TrainOutput) -> int:
    meta = {
        "job_id": job.job_id,
        "cutoff_item_id": job.cutoff,
        "examples": out.examples,
        "steps": out.steps,
        "final_loss": out.final_loss,
        "train_seconds": round(out.seconds, 2),
        "epochs": out.epochs,
        "lr": plan.config.lr,
        "retrieval_k": ctx.settings.train_retrieval_k,
    }
    with unit_of_work(ctx.session_factory) as session:
        done = adapter_repo.by_job(session, job.job_id)
        if done is not None:
            return done.version
        row = adapter_service.publish(
            session,
            ctx.adapter_context(),
            job.owner_key,
            job.user_pk,
            out.files,
            source="trained",
            shared_version=plan.base_shared.version if plan.base_shared is not None else None,
            meta=meta,
            job_id=job.job_id,
            contributors=plan.contributors,
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


def recover_in_process(ctx: JobContext) -> int:
    """Embedded mode (one process): jobs left queued/running by a previous run are re-queued."""
    with unit_of_work(ctx.session_factory) as session:
        active = job_repo.unfinished(session)
        for job in active:
            job.status = "queued"
            after_commit(session, _enqueue_later(ctx.queue, job.id, job.attempts + 1))
    return len(active)


_worker_ctx: JobContext | None = None


def run_job_in_worker(job_id: str) -> None:
    """RQ entry point (runs in the work horse): the context comes from the composition root, once."""
    global _worker_ctx
    if _worker_ctx is None:
        from service.composition import worker_job_context

        _worker_ctx = worker_job_context()
    run_job(_worker_ctx, job_id)
