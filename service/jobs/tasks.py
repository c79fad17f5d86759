"""Job bodies: train a user's (or the shared) LoRA on a recorded history snapshot and publish it; rotate a
user's data key (`user_key_rotation`: the body is `sealing.operations.rotate_user`, finished with no adapter
version). One claim / heartbeat / retry / finish for every kind (`run_job`), one body per kind (`BODIES`).

Idempotent: a job claims itself in SQL (queued -> running), and its publish is keyed by the job id,
so a retried or replayed job never creates a second version. Runs in an RQ work horse (service.jobs.entry)
or in the API process's in-process runner; the model is loaded lazily in the process that trains (CUDA is
never touched by the RQ parent). One training plan per training kind (`PLANNERS`).

The publishing transaction re-checks that the job is still this attempt's and that its owner still exists
(locked against an erase until the commit) BEFORE any file is written: a job whose user was erased while it
trained publishes nothing and leaves no files. Knows nothing of HTTP or of the composition root.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.accounts import repository as account_repo
from service.adapters import repository as adapter_repo
from service.adapters import service as adapter_service
from service.db.session import after_commit, unit_of_work
from service.engine.types import AdapterRef
from service.errors import safe_error_text
from service.history import repository as history_repo
from service.history.repository import OwnerRef
from service.history.service import DocSnapshot, snapshot
from service.jobs import service as jobs
from service.jobs.context import JobContext
from service.jobs.queue import JobQueue, keys_notice
from service.notices import outbox
from service.sealing import operations as sealing_ops
from service.sealing.service import UserDataErased
from service.sealing.session import sealer_of_factory
from service.training.examples import TrainExample, build_shared_examples, build_user_examples
from service.training.trainer import LoraTrainConfig, TrainOutput, train_lora

log = logging.getLogger(__name__)
HEARTBEAT_EVERY_S = 2.0

__all__ = ["JobContext", "JobGone", "JobStopped", "reap", "reap_lost", "reap_stale", "recover_in_process", "run_job"]


class JobGone(Exception):
    """This attempt no longer owns its job: cancelled, taken over, or the row went with its erased owner."""


class JobTimedOut(TimeoutError):
    """The attempt ran past OPPU_JOB_TIMEOUT_S (checked at every progress report, so in-process jobs too, not
    only RQ's work horse): it fails like any error, and is retried up to OPPU_JOB_MAX_ATTEMPTS."""


class JobStopped(Exception):
    """The process is shutting down: this attempt stops and leaves the job as it is (a rotation and a training
    are safe to run again from the start; nothing was published)."""


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
    contributors: tuple[str, ...] = ()  # storage keys of the users whose history is in the examples (erasure)


def run_job(ctx: JobContext, job_id: str) -> None:
    """Claim, train, publish and finish (one transaction), notify; on error retry (bounded) or fail. Safe to
    call twice."""
    with ctx._lock, unit_of_work(ctx.session_factory) as session:
        row = jobs.claim(session, job_id, ctx.settings.job_stale_after_s)
        if row is None:
            return  # done already, or running elsewhere with a live heartbeat
        job = ClaimedJob(row.id, row.kind, row.owner_key, row.user_pk, row.cutoff_item_id, row.attempts)
    try:
        with ctx._lock, _Heartbeat(ctx, job_id, job.attempt) as beat:
            version = BODIES[job.kind](ctx, job, beat)
        if version is not None:
            ctx.queue.publish_adapter(job.owner_key, version)
    except JobGone:
        log.info("job %s attempt %d ended: the job was cancelled, taken over or erased", job_id, job.attempt)
    except JobStopped:
        log.info("job %s attempt %d stopped by a shutdown: queued again, not counted", job_id, job.attempt)
        _give_back(ctx, job)
    except Exception as exc:
        log.error("job %s failed: %s", job_id, safe_error_text(exc))
        _fail_or_retry(ctx, job, exc)


class NothingToTrain(ValueError):
    """The job's examples are empty (the history was deleted meanwhile): every retry would end the same."""


def _fail_or_retry(ctx: JobContext, job: ClaimedJob, exc: Exception) -> None:
    # A failure that a retry cannot change fails the job at this attempt.
    max_attempts = job.attempt if isinstance(exc, NothingToTrain) else ctx.settings.job_max_attempts
    with unit_of_work(ctx.session_factory) as session:
        error = safe_error_text(exc)
        if jobs.fail_or_retry(session, job.job_id, error, max_attempts, attempt=job.attempt):
            after_commit(session, _enqueue_later(ctx.queue, job.job_id, job.attempt + 1))


class _Heartbeat:
    """Refreshes the job's heartbeat (and progress) from a side thread for as long as this attempt works
    on it, model loading and example building included: the reaper must only retry jobs whose process
    died, never one that is slow to reach its first training step."""

    def __init__(self, ctx: JobContext, job_id: str, attempt: int) -> None:
        self._ctx, self._job_id, self._attempt = ctx, job_id, attempt
        self.progress = 0.0
        self.lost = False  # the job is no longer this attempt's: training stops at its next step
        self._every = min(HEARTBEAT_EVERY_S, ctx.settings.job_stale_after_s / 3)
        self._deadline = time.monotonic() + ctx.settings.job_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oppu-job-heartbeat", daemon=True)

    def report(self, fraction: float) -> None:
        if self.lost:
            raise JobGone(self._job_id)
        if self._ctx.stopping.is_set():
            raise JobStopped(self._job_id)
        if time.monotonic() > self._deadline:
            raise JobTimedOut(f"the job ran past OPPU_JOB_TIMEOUT_S ({self._ctx.settings.job_timeout_s} s)")
        self.progress = min(0.99, fraction)
        if self._ctx.on_progress is not None:
            self._ctx.on_progress(fraction)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if time.monotonic() > self._deadline:
                    self._time_out()  # the body may be stuck where it never reports (a read, a lock wait)
                    return
                with unit_of_work(self._ctx.session_factory) as session:
                    if not jobs.heartbeat(session, self._job_id, self.progress, attempt=self._attempt):
                        self.lost = True
            except Exception:
                log.exception("heartbeat of job %s failed", self._job_id)

    def _time_out(self) -> None:
        """Past OPPU_JOB_TIMEOUT_S: this attempt ends as a reported timeout does (retried up to the attempts
        allowed, then failed), whatever the body is doing; should it ever get on, it finds the job no longer its
        own and publishes nothing."""
        error = f"the job ran past OPPU_JOB_TIMEOUT_S ({self._ctx.settings.job_timeout_s} s)"
        with unit_of_work(self._ctx.session_factory) as session:
            max_attempts = self._ctx.settings.job_max_attempts
            if jobs.fail_or_retry(session, self._job_id, error, max_attempts, attempt=self._attempt):
                after_commit(session, _enqueue_later(self._ctx.queue, self._job_id, self._attempt + 1))
        self.lost = True
        log.error("job %s attempt %d: %s", self._job_id, self._attempt, error)

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
    owner = OwnerRef(job.user_pk, job.owner_key)
    items = [snapshot(i) for i in history_repo.all_items(session, owner, up_to_id=job.cutoff)]
    profile = history_repo.get_profile(session, owner) if s.train_use_profile else None
    examples = build_user_examples(
        items,
        k=s.train_retrieval_k,
        profile=profile.text if profile is not None else None,
        item_chars=s.retrieval_item_chars,
        profile_chars=s.profile_max_chars,
        max_examples=s.train_max_examples,
    )
    config = LoraTrainConfig.from_settings(s, stage="user")
    return TrainingPlan(examples, config, adapter_service.shared_ref(session, ctx.store))


def _history_of(session: Session, owner: OwnerRef) -> list[DocSnapshot]:
    """A contributor's history; none for one erased meanwhile (their data key is gone: nothing to read)."""
    try:
        return [snapshot(i) for i in history_repo.all_items(session, owner)]
    except UserDataErased:
        return []


class _Histories(Mapping[str, list[DocSnapshot]]):
    """Every user's history, each read when build_shared_examples asks for it (once per user, in turn) and
    not kept: one user's whole history in memory at a time, not everyone's (only the sampled examples stay).
    Remembers who had any (the shared version's contributors)."""

    def __init__(self, session: Session, users: list[tuple[int, str]]) -> None:
        self._session = session
        self._owners = {key: OwnerRef(pk, key) for pk, key in users}
        self.nonempty: set[str] = set()

    def __getitem__(self, key: str) -> list[DocSnapshot]:
        items = _history_of(self._session, self._owners[key])
        if items:
            self.nonempty.add(key)
        return items

    def __iter__(self) -> Iterator[str]:
        return iter(self._owners)

    def __len__(self) -> int:
        return len(self._owners)


class _Profiles(Mapping[str, str | None]):
    """Each user's profile text, read when build_shared_examples asks for it (once per user, after their history)
    and not kept, as stage 2 reads one; none for a user erased meanwhile."""

    def __init__(self, session: Session, users: list[tuple[int, str]]) -> None:
        self._session = session
        self._owners = {key: OwnerRef(pk, key) for pk, key in users}

    def __getitem__(self, key: str) -> str | None:
        try:
            profile = history_repo.get_profile(self._session, self._owners[key])
        except UserDataErased:
            return None
        return profile.text if profile is not None else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._owners)

    def __len__(self) -> int:
        return len(self._owners)


def _shared_plan(ctx: JobContext, session: Session, job: ClaimedJob) -> TrainingPlan:
    """Stage 1: a sample of every user's history (with their profile, as stage 2 and serving see it), on the
    plain base model."""
    s = ctx.settings
    # Users without history add no example: they neither take a share of the cap nor are read.
    everyone = account_repo.all_user_keys(session)
    users = [(pk, key) for pk, key in everyone if history_repo.max_item_id(session, pk) is not None]
    histories = _Histories(session, users)
    # OPPU_TRAIN_SHARED_MAX_EXAMPLES is shared among them: the examples (memory, training time) no longer grow
    # with the number of users; in all at most max(cap, users).
    per_user = min(s.train_shared_max_per_user, max(1, s.train_shared_max_examples // max(1, len(users))))
    examples = build_shared_examples(
        histories,  # a user without history adds no example and draws nothing from the sampling RNG
        k=s.train_retrieval_k,
        max_per_user=per_user,
        seed=s.train_seed,
        profiles=_Profiles(session, users) if s.train_use_profile else None,
        item_chars=s.retrieval_item_chars,
        profile_chars=s.profile_max_chars,
    )
    contributors = tuple(key for _, key in users if key in histories.nonempty)
    return TrainingPlan(examples, LoraTrainConfig.from_settings(s, stage="shared"), None, contributors)


PLANNERS: dict[str, Callable[[JobContext, Session, ClaimedJob], TrainingPlan]] = {
    "user_retrain": _user_plan,
    "shared_retrain": _shared_plan,
}


def _train_and_publish(ctx: JobContext, job: ClaimedJob, beat: _Heartbeat) -> int:
    with unit_of_work(ctx.session_factory) as session:
        done = adapter_repo.by_job(session, job.job_id)
        if done is not None:  # published by an attempt that died before marking the job finished
            _hold(session, job)
            jobs.finish(session, job.job_id, adapter_version=done.version, attempt=job.attempt)
            return done.version
        plan = PLANNERS[job.kind](ctx, session, job)
    if not plan.examples:
        raise NothingToTrain("no history to train on")
    beat.report(0.0)  # planning has no progress of its own: a cancel, shutdown or timeout meanwhile ends it here
    model = ctx.training_model(plan.base_shared)
    loaded, _ = ctx.base()
    out = train_lora(
        model, loaded.tokenizer, plan.examples, plan.config, base_model_name=loaded.name, progress=beat.report
    )
    return _publish(ctx, job, plan, out)


def _hold(session: Session, job: ClaimedJob) -> None:
    """The first statements of a publishing transaction: the owner still exists (locked against an erase
    until the commit on PostgreSQL), then the job is still this attempt's (its row is written, which takes
    SQLite's write lock, so no erase commits in between). JobGone otherwise: nothing is written."""
    if job.user_pk is not None and not account_repo.lock_owner(session, job.user_pk, job.owner_key):
        raise JobGone(job.job_id)
    if not jobs.heartbeat(session, job.job_id, 0.99, attempt=job.attempt):
        raise JobGone(job.job_id)


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
        _hold(session, job)  # before any file is written
        done, erased = adapter_repo.by_job(session, job.job_id), set[str]()
        if done is None:
            erased = set(plan.contributors) - account_repo.existing_storage_keys(session, plan.contributors)
            done = adapter_service.publish(
                session,
                ctx.adapter_context(),
                job.owner_key,
                job.user_pk,
                out.files,
                source="trained",
                shared_version=plan.base_shared.version if plan.base_shared is not None else None,
                meta=meta,
                job_id=job.job_id,
                contributors=set(plan.contributors) - erased,
            )
            if erased:  # a contributor was erased while this job trained on their history
                adapter_repo.flag_version_trained_on_erased(session, job.owner_key, done.version)
        jobs.finish(session, job.job_id, adapter_version=done.version, attempt=job.attempt)
        if erased:  # after finish: OPPU_SHARED_ON_ERASE=retrain requests the next job (this one is done)
            adapter_service.retire_shared_trained_on_erased(session, ctx.adapter_context())
        return done.version


def _rotate_data_key(ctx: JobContext, job: ClaimedJob, beat: _Heartbeat) -> None:
    """A user's data-key rotation (`sealing.operations.rotate_user`), then finished with no adapter version in a
    transaction that holds the owner. An owner erased meanwhile ends the job quietly (JobGone): their keys and
    rows are gone, there is nothing left to rotate."""
    assert job.user_pk is not None
    owner = OwnerRef(job.user_pk, job.owner_key)
    sealer = sealer_of_factory(ctx.session_factory)
    if not sealer.enabled:
        raise RuntimeError("this server does not seal data at rest (OPPU_SEAL_AT_REST=false)")
    publish = keys_notice(ctx.queue)

    def notify(storage_key: str) -> None:
        with unit_of_work(ctx.session_factory) as session:
            outbox.record_keys(session, storage_key)  # replicas that miss the fast path poll it
        publish(storage_key)

    settle_s = ctx.key_settle_s
    if settle_s is None:
        settle_s = sealing_ops.settle_seconds(ctx.settings.key_recheck_s)
    try:
        done = sealing_ops.rotate_user(
            ctx.session_factory, ctx.store, sealer, owner, settle_s=settle_s, notify=notify, progress=beat.report
        )
    except UserDataErased:
        raise JobGone(job.job_id) from None
    with unit_of_work(ctx.session_factory) as session:
        _hold(session, job)
        jobs.finish(session, job.job_id, adapter_version=None, attempt=job.attempt)
    log.info("job %s: data key of %s rotated, %d rows and adapter versions re-sealed", job.job_id, job.owner_key, done)


BODIES: dict[str, Callable[[JobContext, ClaimedJob, _Heartbeat], int | None]] = {
    "user_retrain": _train_and_publish,
    "shared_retrain": _train_and_publish,
    "user_key_rotation": _rotate_data_key,
}


def reap_stale(ctx: JobContext) -> int:
    """Running jobs whose worker stopped heart-beating go back to queued (marked: enqueued once, not on every
    tick) and are enqueued after the commit; past max attempts they fail. Returns how many changed."""
    with unit_of_work(ctx.session_factory) as session:
        again, failed = jobs.requeue_stale(session, ctx.settings.job_stale_after_s, ctx.settings.job_max_attempts)
        _enqueue_after_commit(session, ctx.queue, again)
    return len(again) + failed


def reap_lost(ctx: JobContext) -> int:
    """Queued jobs whose queue message may be lost (Redis was down at the enqueue, or came back empty) are
    enqueued again, each at most once per OPPU_JOB_REQUEUE_AFTER_S (the queue skips an attempt it holds)."""
    with unit_of_work(ctx.session_factory) as session:
        again = jobs.requeue_lost(session, ctx.settings.job_requeue_after_s)
        _enqueue_after_commit(session, ctx.queue, again)
    return len(again)


def reap(ctx: JobContext) -> int:
    """One reaper tick (the worker's side thread): dead workers' jobs, then lost queue messages."""
    return reap_stale(ctx) + reap_lost(ctx)


def prune(ctx: JobContext) -> int:
    """Finished jobs past OPPU_JOB_KEEP_S are deleted (a bounded batch per call); returns how many."""
    with unit_of_work(ctx.session_factory) as session:
        return jobs.prune_finished(session, ctx.settings.job_keep_s)


def _enqueue_after_commit(session: Session, queue: JobQueue, jobs_: list[tuple[str, int]]) -> None:
    for job_id, attempt in jobs_:
        after_commit(session, _enqueue_later(queue, job_id, attempt))


def _enqueue_later(queue: JobQueue, job_id: str, attempt: int) -> Callable[[], None]:
    return lambda: queue.enqueue(job_id, attempt)


def _give_back(ctx: JobContext, job: ClaimedJob) -> None:
    """A stopped attempt does not count against OPPU_JOB_MAX_ATTEMPTS (graceful restarts would use them up);
    left running if the database cannot be reached now (then the start-up recovery or the reaper counts it)."""
    try:
        with unit_of_work(ctx.session_factory) as session:
            jobs.stopped(session, job.job_id, job.attempt)
    except Exception as exc:  # shutting down: nothing to retry here
        log.warning("job %s: its stopped attempt could not be given back: %s", job.job_id, safe_error_text(exc))


def recover_in_process(ctx: JobContext) -> int:
    """Embedded mode: jobs left queued, or running without a heartbeat, by a previous run are re-queued (those
    that were on their last attempt fail); a job another live process runs is left to it."""
    with unit_of_work(ctx.session_factory) as session:
        again = jobs.requeue_unfinished(session, ctx.settings.job_stale_after_s, ctx.settings.job_max_attempts)
        _enqueue_after_commit(session, ctx.queue, again)
    return len(again)
