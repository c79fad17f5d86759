"""Job bodies (service.jobs.tasks) on SQLite and PostgreSQL with the tiny model: idempotency, takeover of
a job that published but died before finishing, bounded retries, the stale-job reaper, and the data a
user's training sees (own items only, up to the recorded cutoff)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import data_rights
from service.adapters import repository as adapter_repo
from service.adapters.store import AdapterStore
from service.composition import database, sealer_of
from service.db.models import SHARED_OWNER, Adapter, AdapterContributor, Job
from service.db.session import unit_of_work
from service.engine.types import AdapterRef
from service.errors import NotFound
from service.history import service as history
from service.history.schemas import HistoryAppendIn
from service.jobs import repository as jobs_repo
from service.jobs import service as jobs
from service.jobs import tasks
from service.jobs.queue import Listeners
from service.jobs.tasks import JobContext, reap_lost, reap_stale, run_job
from service.tenancy import UserRef
from service.training.examples import TrainExample
from service.training.trainer import train_lora
from service.users import create_user
from tests.conftest import make_settings

CANARY = "CANARY-7f3e-other-user"
LATE = "LATE-ITEM-after-cutoff"


@dataclass
class FakeQueue:
    enqueued: list[tuple[str, int]] = field(default_factory=list)
    published: list[tuple[str, int | None]] = field(default_factory=list)

    def enqueue(self, job_id: str, attempt: int) -> None:
        self.enqueued.append((job_id, attempt))

    def depth(self) -> int:
        return len(self.enqueued)

    def publish_adapter(self, owner_key: str, version: int | None) -> None:
        self.published.append((owner_key, version))

    def publish_revoked(self, key_hashes: list[str]) -> None: ...

    def subscribe(self, listeners: Listeners, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


@pytest.fixture
def stale_after_s() -> float:
    return 30.0


@pytest.fixture
def ctx(tmp_path: Path, db_url: str, tiny_model_path: Path, stale_after_s: float) -> Iterator[JobContext]:
    settings = make_settings(
        tmp_path,
        db_url,
        str(tiny_model_path),
        train_user_epochs=1,
        train_batch_size=4,
        train_retrieval_k=1,
        job_max_attempts=3,
        job_stale_after_s=stale_after_s,
        torch_threads=1,
    )
    db = database(settings)  # sessions that seal, as the composition root builds them
    yield JobContext(settings, db.session_factory, AdapterStore(settings.adapters_dir, sealer_of(db)), FakeQueue())
    db.dispose()


def fake_queue(ctx: JobContext) -> FakeQueue:
    assert isinstance(ctx.queue, FakeQueue)
    return ctx.queue


def add_user(factory: sessionmaker[Session], user_id: str, items: list[tuple[str | None, str]]) -> UserRef:
    with unit_of_work(factory) as session:
        user, _ = create_user(session, user_id)
    append(factory, user, items, prefix="i")
    return user


def append(factory: sessionmaker[Session], user: UserRef, items: list[tuple[str | None, str]], prefix: str) -> None:
    body = HistoryAppendIn.model_validate(
        {"items": [{"id": f"{prefix}{n}", "input": i, "output": o} for n, (i, o) in enumerate(items)]}
    )
    with unit_of_work(factory) as session:
        history.append(session, user, body)


def request(ctx: JobContext, user: UserRef) -> str:
    with unit_of_work(ctx.session_factory) as session:
        out, created = jobs.request_job(session, ctx.queue, "user_retrain", user.storage_key, user.pk)
    assert created
    return out.job_id


def job_row(ctx: JobContext, job_id: str) -> Job:
    with unit_of_work(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def version_count(ctx: JobContext, owner_key: str) -> int:
    with unit_of_work(ctx.session_factory) as session:
        return int(session.scalar(select(func.count()).select_from(Adapter).where(Adapter.owner_key == owner_key)) or 0)


def set_running(ctx: JobContext, job_id: str, heartbeat_age_s: float, **values: Any) -> None:
    beat = datetime.now(UTC) - timedelta(seconds=heartbeat_age_s)
    with unit_of_work(ctx.session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", heartbeat_at=beat, **values))


def qa(n: int, tag: str = "") -> list[tuple[str | None, str]]:
    return [(f"question {i} about topic {i % 3}", f"answer {i} {tag}".strip()) for i in range(n)]


def fail_training(*_: Any, **__: Any) -> Any:
    raise RuntimeError("boom in training")


# --- idempotency ---


def test_run_job_twice_after_success_makes_no_second_version(ctx: JobContext) -> None:
    user = add_user(ctx.session_factory, "alice", qa(5))
    job_id = request(ctx, user)
    assert fake_queue(ctx).enqueued == [(job_id, 1)]  # enqueued after the commit, ids only
    run_job(ctx, job_id)
    job = job_row(ctx, job_id)
    assert (job.status, job.adapter_version, job.attempts, job.progress) == ("succeeded", 1, 1, 1.0)
    run_job(ctx, job_id)  # e.g. a duplicated queue message
    job = job_row(ctx, job_id)
    assert (job.status, job.adapter_version, job.attempts) == ("succeeded", 1, 1)
    assert version_count(ctx, user.storage_key) == 1
    assert fake_queue(ctx).published == [(user.storage_key, 1)]


def test_published_but_not_finished_job_finishes_without_second_version(
    ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = add_user(ctx.session_factory, "bob", qa(4))
    job_id = request(ctx, user)
    run_job(ctx, job_id)  # publishes v1 keyed by the job id
    # The attempt died after the publish commit but before `finish`: running, stale heartbeat.
    set_running(ctx, job_id, heartbeat_age_s=3600, adapter_version=None, progress=0.5, finished_at=None)
    monkeypatch.setattr(tasks, "train_lora", fail_training)  # a takeover must not train again
    run_job(ctx, job_id)
    job = job_row(ctx, job_id)
    assert (job.status, job.adapter_version, job.attempts) == ("succeeded", 1, 2)
    assert version_count(ctx, user.storage_key) == 1


def test_running_job_with_live_heartbeat_is_left_alone(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    user = add_user(ctx.session_factory, "carol", qa(3))
    job_id = request(ctx, user)
    set_running(ctx, job_id, heartbeat_age_s=0, attempts=1)
    monkeypatch.setattr(tasks, "train_lora", fail_training)
    run_job(ctx, job_id)  # another worker owns it
    job = job_row(ctx, job_id)
    assert (job.status, job.attempts, job.error) == ("running", 1, None)
    assert version_count(ctx, user.storage_key) == 0


# --- retries ---


def test_failures_retry_until_max_attempts_then_fail(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "train_lora", fail_training)
    user = add_user(ctx.session_factory, "dave", qa(3))
    job_id = request(ctx, user)
    queue = fake_queue(ctx)
    for attempt in (1, 2):
        run_job(ctx, job_id)
        job = job_row(ctx, job_id)
        assert (job.status, job.attempts) == ("queued", attempt)
        assert job.error is not None and "boom in training" in job.error
        assert queue.enqueued[-1] == (job_id, attempt + 1)
    run_job(ctx, job_id)
    job = job_row(ctx, job_id)
    assert (job.status, job.attempts) == ("failed", 3)
    assert job.finished_at is not None and job.error is not None and "boom" in job.error
    assert queue.enqueued == [(job_id, 1), (job_id, 2), (job_id, 3)]  # no 4th attempt
    run_job(ctx, job_id)  # a failed job is final
    assert job_row(ctx, job_id).attempts == 3
    assert version_count(ctx, user.storage_key) == 0 and queue.published == []
    # The owner can ask again: a failed job does not block a new one.
    assert request(ctx, user) != job_id


def test_an_attempt_past_the_job_timeout_fails_and_is_retried(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """OPPU_JOB_TIMEOUT_S holds for every queue (RQ enforces it in its work horse; the in-process runner did
    not): the attempt stops at its next progress report and publishes nothing."""
    ctx.settings = ctx.settings.model_copy(update={"job_timeout_s": 1})
    finished: list[bool] = []

    def slow_training(*args: Any, progress: Any, **kwargs: Any) -> Any:
        time.sleep(1.2)
        progress(0.5)  # past the deadline (maybe reached earlier on a loaded box): raises
        finished.append(True)
        return train_lora(*args, progress=progress, **kwargs)

    monkeypatch.setattr(tasks, "train_lora", slow_training)
    user = add_user(ctx.session_factory, "tim", qa(3))
    job_id = request(ctx, user)
    run_job(ctx, job_id)
    job = job_row(ctx, job_id)
    assert finished == []
    assert (job.status, job.attempts) == ("queued", 1)
    assert job.error is not None and "OPPU_JOB_TIMEOUT_S (1 s)" in job.error
    assert fake_queue(ctx).enqueued[-1] == (job_id, 2)
    assert version_count(ctx, user.storage_key) == 0 and fake_queue(ctx).published == []


def test_fail_or_retry_is_bounded_by_max_attempts(ctx: JobContext) -> None:
    user = add_user(ctx.session_factory, "erin", qa(2))
    job_id = request(ctx, user)
    with unit_of_work(ctx.session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=1))
        assert jobs.fail_or_retry(session, job_id, "x" * 5000, max_attempts=2) is True
    job = job_row(ctx, job_id)
    assert job.status == "queued" and job.error is not None and len(job.error) == 2000
    with unit_of_work(ctx.session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=2))
        assert jobs.fail_or_retry(session, job_id, "again", max_attempts=2) is False
        assert jobs.fail_or_retry(session, "no-such-job", "x", max_attempts=2) is False
    job = job_row(ctx, job_id)
    assert (job.status, job.error) == ("failed", "again") and job.finished_at is not None


def test_a_superseded_attempt_cannot_requeue_or_fail_the_job(ctx: JobContext) -> None:
    user = add_user(ctx.session_factory, "ivan", qa(2))
    job_id = request(ctx, user)
    set_running(ctx, job_id, heartbeat_age_s=0, attempts=2)  # attempt 1 was taken over by attempt 2
    with unit_of_work(ctx.session_factory) as session:
        assert jobs.fail_or_retry(session, job_id, "late failure of attempt 1", 3, attempt=1) is False
        jobs.heartbeat(session, job_id, 0.9, attempt=1)  # nor keep it alive
    job = job_row(ctx, job_id)
    assert (job.status, job.attempts, job.error, job.progress) == ("running", 2, None, 0.0)
    with unit_of_work(ctx.session_factory) as session:
        jobs.finish(session, job_id, adapter_version=1)
    with unit_of_work(ctx.session_factory) as session:  # a finished job stays finished
        assert jobs.fail_or_retry(session, job_id, "late", 3) is False
    assert job_row(ctx, job_id).status == "succeeded"


# --- reaper ---


@pytest.mark.parametrize("stale_after_s", [0.6])
def test_slow_start_keeps_a_live_heartbeat(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model loading happens before the first training step: the job must not look dead meanwhile."""
    seen_stale: list[int] = []
    real = ctx.training_model

    def slow_training_model(shared: AdapterRef | None) -> Any:
        time.sleep(1.5)  # 2.5x the stale threshold
        seen_stale.append(reap_stale(ctx))
        return real(shared)

    monkeypatch.setattr(ctx, "training_model", slow_training_model)
    user = add_user(ctx.session_factory, "judy", qa(3))
    job_id = request(ctx, user)
    run_job(ctx, job_id)
    assert seen_stale == [0]
    job = job_row(ctx, job_id)
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert fake_queue(ctx).enqueued == [(job_id, 1)]


def test_reap_stale_requeues_stale_running_jobs_only(ctx: JobContext) -> None:
    stale_user = add_user(ctx.session_factory, "frank", qa(2))
    live_user = add_user(ctx.session_factory, "gina", qa(2))
    spent_user = add_user(ctx.session_factory, "hank", qa(2))
    stale, live, spent = request(ctx, stale_user), request(ctx, live_user), request(ctx, spent_user)
    set_running(ctx, stale, heartbeat_age_s=120, attempts=1)
    set_running(ctx, live, heartbeat_age_s=1, attempts=1)
    set_running(ctx, spent, heartbeat_age_s=120, attempts=3)
    queue = fake_queue(ctx)
    queue.enqueued.clear()
    assert reap_stale(ctx) == 2
    assert queue.enqueued == [(stale, 2)]
    assert job_row(ctx, spent).status == "failed"
    assert job_row(ctx, live).status == "running"
    assert job_row(ctx, stale).status == "queued" and job_row(ctx, stale).requeued_at is not None  # marked
    assert reap_stale(ctx) == 0  # the next tick does not enqueue it again (the queue depth stays true)
    assert queue.enqueued == [(stale, 2)]
    # The re-enqueued attempt takes the job over and completes it.
    run_job(ctx, stale)
    job = job_row(ctx, stale)
    assert (job.status, job.attempts, job.adapter_version) == ("succeeded", 2, 1)


def test_the_reaper_prunes_finished_jobs_past_the_keep_time(ctx: JobContext) -> None:
    from service.jobs.worker import run_reaper

    user = add_user(ctx.session_factory, "ivy", qa(2))
    job_id = request(ctx, user)
    run_job(ctx, job_id)
    long_ago = datetime.now(UTC) - timedelta(seconds=ctx.settings.job_keep_s + 60)
    with unit_of_work(ctx.session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(finished_at=long_ago))
    stop = threading.Event()
    reaper = threading.Thread(target=run_reaper, args=(ctx.settings, ctx, stop))
    reaper.start()
    deadline = time.monotonic() + 10
    while job_exists(ctx, job_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    reaper.join(10)
    assert not job_exists(ctx, job_id)


def job_exists(ctx: JobContext, job_id: str) -> bool:
    with unit_of_work(ctx.session_factory) as session:
        return session.get(Job, job_id) is not None


# --- what training sees ---


def test_training_uses_only_own_items_up_to_the_cutoff(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[TrainExample] = []
    real_train = train_lora  # what service.jobs.tasks calls, patched there below

    def capture(model: Any, tokenizer: Any, examples: list[TrainExample], *args: Any, **kwargs: Any) -> Any:
        captured.extend(examples)
        return real_train(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(tasks, "train_lora", capture)
    factory = ctx.session_factory
    # The other user's items share A's vocabulary, so BM25 would pick them if it could see them.
    other = add_user(factory, "mallory", [(f"question {i} about topic {i % 3}", f"{CANARY} {i}") for i in range(6)])
    with unit_of_work(factory) as session:
        history.set_profile(session, other, f"profile {CANARY}")
    user = add_user(factory, "alice", qa(6, "alpha"))
    job_id = request(ctx, user)
    append(factory, user, [(f"question about topic 1 {LATE}", f"answer {LATE}")], prefix="late")  # after request
    append(factory, other, [(f"question 9 about topic 0 {CANARY}", CANARY)], prefix="more")
    run_job(ctx, job_id)
    assert job_row(ctx, job_id).status == "succeeded"
    assert [ex.item_id for ex in captured] == [f"i{n}" for n in range(6)]
    for ex in captured:
        assert CANARY not in ex.prompt and CANARY not in ex.target
        assert LATE not in ex.prompt and LATE not in ex.target
        assert "alpha" in ex.target
    # k=1: from the second item on, the prompt carries one retrieved item, and it is one of A's own.
    assert all("alpha" in ex.prompt for ex in captured[1:])
    with unit_of_work(factory) as session:
        meta = session.scalars(select(Adapter.meta).where(Adapter.job_id == job_id)).one()
    assert meta is not None and meta["examples"] == 6 and meta["cutoff_item_id"] == job_row(ctx, job_id).cutoff_item_id


def test_a_retrain_learns_from_the_most_recent_train_max_examples_items(
    ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: list[TrainExample] = []
    real_train = train_lora

    def capture(model: Any, tokenizer: Any, examples: list[TrainExample], *args: Any, **kwargs: Any) -> Any:
        captured.extend(examples)
        return real_train(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(tasks, "train_lora", capture)
    ctx.settings = ctx.settings.with_overrides(train_max_examples=3)
    user = add_user(ctx.session_factory, "long-history", qa(8, "beta"))
    job_id = request(ctx, user)
    run_job(ctx, job_id)
    assert job_row(ctx, job_id).status == "succeeded"
    assert [ex.item_id for ex in captured] == ["i5", "i6", "i7"]
    assert all("beta" in ex.prompt for ex in captured)  # each still retrieves from the earlier, uncapped items


# --- stage 1 (the shared task LoRA): bounded as a whole, trained with the profiles that serving uses ---


def shared_plan(ctx: JobContext) -> tasks.TrainingPlan:
    """What a shared retrain would train on now (its planner, without training)."""
    job = tasks.ClaimedJob("plan-only", "shared_retrain", SHARED_OWNER, None, None, 1)
    with unit_of_work(ctx.session_factory) as session:
        return tasks.PLANNERS["shared_retrain"](ctx, session, job)


@pytest.mark.parametrize(
    ("with_history", "without_history", "cap", "per_user"),
    [
        (2, 4, 4, 2),  # the cap is shared among the users WITH history only (4 // 2, not 4 // 6)
        (5, 0, 3, 1),  # more users than the cap: one example each (the total is at most max(cap, users))
    ],
)
def test_a_shared_retrain_takes_at_most_train_shared_max_examples_in_all(
    ctx: JobContext, with_history: int, without_history: int, cap: int, per_user: int
) -> None:
    # 60 users x 200 items (the per-user sample) made 12,000 examples: the job ran past its timeout and retried.
    ctx.settings = ctx.settings.with_overrides(train_shared_max_examples=cap, train_shared_max_per_user=200)
    for n in range(with_history):
        add_user(ctx.session_factory, f"hist{n}", qa(4, f"tag{n}x"))
    for n in range(without_history):
        with unit_of_work(ctx.session_factory) as session:
            create_user(session, f"empty{n}")
    plan = shared_plan(ctx)
    assert len(plan.examples) == with_history * per_user
    for n in range(with_history):
        assert sum(f"tag{n}x" in ex.target for ex in plan.examples) == per_user
    assert len(plan.contributors) == with_history


@pytest.mark.parametrize("use_profile", [True, False])
def test_a_shared_retrain_trains_with_each_users_own_profile(ctx: JobContext, use_profile: bool) -> None:
    # Stage 2 and serving put the profile in the prompt: stage 1 trained without it.
    ctx.settings = ctx.settings.with_overrides(train_use_profile=use_profile)
    users = {tag: add_user(ctx.session_factory, f"user-{tag}", qa(3, tag)) for tag in ("alpha", "beta")}
    add_user(ctx.session_factory, "no-profile", qa(3, "gamma"))
    with unit_of_work(ctx.session_factory) as session:
        for tag, user in users.items():
            history.set_profile(session, user, f"PROFILE-{tag}-likes-{tag}")
    plan = shared_plan(ctx)
    assert len(plan.examples) == 9
    for ex in plan.examples:
        (tag,) = [t for t in ("alpha", "beta", "gamma") if t in ex.target]
        profiles = [t for t in ("alpha", "beta", "gamma") if f"PROFILE-{t}" in ex.prompt]
        assert profiles == ([tag] if use_profile and tag != "gamma" else [])


# --- a retrain racing an erase (issue 23 N3) ---


def erase(ctx: JobContext, user: UserRef) -> None:
    with unit_of_work(ctx.session_factory) as session:
        data_rights.erase_user(session, ctx.adapter_context(), user)


def adapter_rows(ctx: JobContext) -> list[tuple[str, int, int | None, bool]]:
    with unit_of_work(ctx.session_factory) as session:
        rows = session.execute(select(Adapter.owner_key, Adapter.version, Adapter.user_pk, Adapter.trained_on_erased))
        return [(o, v, pk, flag) for o, v, pk, flag in rows]


def test_a_job_with_nothing_to_train_fails_at_once_instead_of_retrying(ctx: JobContext) -> None:
    """The history went between the request and the run (or a bulk retrain named a user without one)."""
    with unit_of_work(ctx.session_factory) as session:
        user, _ = create_user(session, "ida")
    job_id = request(ctx, user)
    run_job(ctx, job_id)
    row = job_row(ctx, job_id)
    assert (row.status, row.attempts) == ("failed", 1) and "no history to train on" in (row.error or "")
    assert fake_queue(ctx).enqueued == [(job_id, 1)]  # the request's enqueue only: no retry


def test_a_job_requested_for_a_user_erased_after_being_resolved_is_404_not_a_server_error(ctx: JobContext) -> None:
    """The route resolved the user, then an erase committed before the job row went in (its FK has no user)."""
    user = add_user(ctx.session_factory, "gil", qa(3))
    erase(ctx, user)
    for kind in ("user_retrain", "user_key_rotation"):
        with pytest.raises(NotFound), unit_of_work(ctx.session_factory) as session:
            jobs.request_job(session, ctx.queue, kind, user.storage_key, user.pk)
    with unit_of_work(ctx.session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert fake_queue(ctx).enqueued == []


def test_a_retrain_whose_user_is_erased_mid_training_publishes_nothing(
    ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The erase commits while the job trains, and the next user is created at once (on a reused pk the old job
    published the erased history as theirs, under the erased storage key's folder)."""
    user = add_user(ctx.session_factory, "olga", qa(4))
    job_id = request(ctx, user)
    newcomer: list[UserRef] = []

    def erase_meanwhile(*args: Any, **kwargs: Any) -> Any:
        out = train_lora(*args, **kwargs)
        erase(ctx, user)
        newcomer.append(add_user(ctx.session_factory, "pete", qa(2)))
        return out

    monkeypatch.setattr(tasks, "train_lora", erase_meanwhile)
    run_job(ctx, job_id)
    assert newcomer[0].pk != user.pk
    assert adapter_rows(ctx) == []  # nothing published, for nobody
    assert not ctx.store.key_dir(user.storage_key).exists()  # and no files left behind
    assert not ctx.store.key_dir(newcomer[0].storage_key).exists()
    assert fake_queue(ctx).published == []
    with unit_of_work(ctx.session_factory) as session:
        assert session.get(Job, job_id) is None  # went with its owner


def test_a_shared_retrain_flags_a_contributor_erased_while_it_trained(
    ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    stays, goes = add_user(ctx.session_factory, "quinn", qa(3)), add_user(ctx.session_factory, "rita", qa(3))
    with unit_of_work(ctx.session_factory) as session:
        out, _ = jobs.request_job(session, ctx.queue, "shared_retrain", SHARED_OWNER, None)

    def erase_meanwhile(*args: Any, **kwargs: Any) -> Any:
        result = train_lora(*args, **kwargs)
        erase(ctx, goes)
        add_user(ctx.session_factory, "sven", qa(2))  # would get rita's pk without AUTOINCREMENT
        return result

    monkeypatch.setattr(tasks, "train_lora", erase_meanwhile)
    run_job(ctx, out.job_id)
    assert job_row(ctx, out.job_id).status == "succeeded"
    assert [(o, v, flag) for o, v, _, flag in adapter_rows(ctx)] == [(SHARED_OWNER, 1, True)]
    with unit_of_work(ctx.session_factory) as session:
        assert set(session.scalars(select(AdapterContributor.storage_key))) == {stays.storage_key}
        # OPPU_SHARED_ON_ERASE=retire (the default): published flagged, so retired in the same transaction.
        assert adapter_repo.current_version(session, SHARED_OWNER) is None
        assert jobs_repo.active(session, SHARED_OWNER) is None  # retire asks for no retrain


@pytest.mark.parametrize("policy", ["flag", "retrain"])
def test_a_shared_version_published_after_a_contributor_left_follows_the_setting(
    ctx: JobContext, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """flag: served although flagged; retrain: retired at its publish, and the next shared job is queued."""
    ctx.settings = ctx.settings.with_overrides(shared_on_erase=policy)
    add_user(ctx.session_factory, "uli", qa(3))
    goes = add_user(ctx.session_factory, "vera", qa(3))
    with unit_of_work(ctx.session_factory) as session:
        out, _ = jobs.request_job(session, ctx.queue, "shared_retrain", SHARED_OWNER, None)

    def erase_meanwhile(*args: Any, **kwargs: Any) -> Any:
        result = train_lora(*args, **kwargs)
        erase(ctx, goes)
        return result

    monkeypatch.setattr(tasks, "train_lora", erase_meanwhile)
    run_job(ctx, out.job_id)
    assert job_row(ctx, out.job_id).status == "succeeded"
    with unit_of_work(ctx.session_factory) as session:
        current = adapter_repo.current_version(session, SHARED_OWNER)
        following = jobs_repo.active(session, SHARED_OWNER)
        assert (current, following is not None) == ((1, False) if policy == "flag" else (None, True))
        following_id = following.id if following is not None else None
    if following_id is not None:  # queued after the commit, then trained on the users there are now
        assert following_id != out.job_id and fake_queue(ctx).enqueued[-1] == (following_id, 1)
        monkeypatch.setattr(tasks, "train_lora", train_lora)
        run_job(ctx, following_id)
        with unit_of_work(ctx.session_factory) as session:
            assert adapter_repo.current_version(session, SHARED_OWNER) == 2
            assert not adapter_repo.is_trained_on_erased(session, SHARED_OWNER, 2)


def test_a_cancelled_job_stops_and_publishes_nothing(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    user = add_user(ctx.session_factory, "tess", qa(3))
    job_id = request(ctx, user)

    def cancel_meanwhile(*args: Any, **kwargs: Any) -> Any:
        result = train_lora(*args, **kwargs)
        with unit_of_work(ctx.session_factory) as session:
            assert jobs.cancel(session, job_id).status == "cancelled"
        return result

    monkeypatch.setattr(tasks, "train_lora", cancel_meanwhile)
    run_job(ctx, job_id)
    job = job_row(ctx, job_id)
    assert (job.status, job.adapter_version) == ("cancelled", None)
    assert adapter_rows(ctx) == [] and not ctx.store.key_dir(user.storage_key).exists()
    assert request(ctx, user) != job_id  # a cancelled job does not block a new one


@pytest.mark.parametrize("stale_after_s", [30.0])
def test_a_queued_job_whose_message_was_lost_is_enqueued_again_once_per_period(ctx: JobContext) -> None:
    """Redis was down when the job was requested (issue 23 N4): the row is queued, no message exists."""
    user = add_user(ctx.session_factory, "uma", qa(3))
    job_id = request(ctx, user)
    queue = fake_queue(ctx)
    queue.enqueued.clear()  # the enqueue after the commit was lost
    assert reap_lost(ctx) == 0  # younger than OPPU_JOB_REQUEUE_AFTER_S: its message may still be on its way
    with unit_of_work(ctx.session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(requeued_at=datetime.now(UTC) - timedelta(hours=1)))
    assert reap_lost(ctx) == 1 and queue.enqueued == [(job_id, 1)]
    assert reap_lost(ctx) == 0 and queue.enqueued == [(job_id, 1)]  # marked: once per period
    run_job(ctx, job_id)
    assert job_row(ctx, job_id).status == "succeeded"
    assert reap_lost(ctx) == 0


def test_start_up_recovery_requeues_running_jobs_through_the_repository(ctx: JobContext) -> None:
    user = add_user(ctx.session_factory, "vic", qa(3))
    job_id = request(ctx, user)
    set_running(ctx, job_id, heartbeat_age_s=3600, attempts=1)
    queue = fake_queue(ctx)
    queue.enqueued.clear()
    assert tasks.recover_in_process(ctx) == 1
    assert queue.enqueued == [(job_id, 2)] and job_row(ctx, job_id).status == "queued"


def test_start_up_recovery_leaves_a_job_that_another_live_process_runs(ctx: JobContext) -> None:
    """`oppu keys rotate-user` (or a second replica without Redis) runs the job and beats: an embedded start
    re-queued it anyway, so it ran twice at once and the CLI's attempt ended as JobGone (exit 1)."""
    user = add_user(ctx.session_factory, "vic", qa(3))
    job_id = request(ctx, user)
    with unit_of_work(ctx.session_factory) as session:
        claimed = jobs.claim(session, job_id, ctx.settings.job_stale_after_s)
        assert claimed is not None
        attempt = claimed.attempts
    with unit_of_work(ctx.session_factory) as session:
        assert jobs.heartbeat(session, job_id, 0.3, attempt=attempt)
    queue = fake_queue(ctx)
    queue.enqueued.clear()
    assert tasks.recover_in_process(ctx) == 0 and queue.enqueued == []
    with unit_of_work(ctx.session_factory) as session:  # the live attempt still owns its job
        assert jobs.heartbeat(session, job_id, 0.4, attempt=attempt)


def test_start_up_recovery_fails_a_job_that_was_on_its_last_attempt(ctx: JobContext) -> None:
    """An attempt that kills the process (out of memory) was re-queued at every start, past
    OPPU_JOB_MAX_ATTEMPTS: a crash loop of the embedded server. It fails, as the reaper fails one."""
    user = add_user(ctx.session_factory, "wes", qa(3))
    job_id = request(ctx, user)
    set_running(ctx, job_id, heartbeat_age_s=3600, attempts=ctx.settings.job_max_attempts)
    queue = fake_queue(ctx)
    queue.enqueued.clear()
    assert tasks.recover_in_process(ctx) == 0 and queue.enqueued == []
    job = job_row(ctx, job_id)
    assert job.status == "failed" and "last attempt" in (job.error or "")


def test_an_attempt_stopped_by_a_shutdown_is_given_back(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graceful restarts mid-training must not use up the job's attempts (nor fail it at the next start)."""
    user = add_user(ctx.session_factory, "xia", qa(3))
    job_id = request(ctx, user)

    def stopped(*_: Any, **__: Any) -> Any:
        raise tasks.JobStopped(job_id)

    monkeypatch.setitem(tasks.BODIES, "user_retrain", stopped)
    for _ in range(ctx.settings.job_max_attempts + 1):
        run_job(ctx, job_id)
        job = job_row(ctx, job_id)
        assert (job.status, job.attempts) == ("queued", 0)
    monkeypatch.undo()
    run_job(ctx, job_id)
    assert job_row(ctx, job_id).status == "succeeded"


def test_an_attempt_stuck_where_it_never_reports_still_times_out(
    ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The timeout was checked only at progress reports: a body stuck before its first one (a read, a lock wait)
    # kept heart-beating and stayed running forever; the owner could never retrain.
    ctx.settings = ctx.settings.model_copy(update={"job_timeout_s": 1, "job_max_attempts": 1})
    monkeypatch.setattr(tasks, "HEARTBEAT_EVERY_S", 0.1)
    stuck = threading.Event()

    def hang(*_: Any) -> Any:
        stuck.wait(30)
        raise RuntimeError("released")

    monkeypatch.setitem(tasks.PLANNERS, "user_retrain", hang)
    user = add_user(ctx.session_factory, "sue", qa(2))
    job_id = request(ctx, user)
    worker = threading.Thread(target=run_job, args=(ctx, job_id), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while job_row(ctx, job_id).status in ("queued", "running"):
            assert time.monotonic() < deadline, "the stuck attempt never timed out"
            time.sleep(0.05)
        job = job_row(ctx, job_id)
        assert job.status == "failed" and job.error is not None and "OPPU_JOB_TIMEOUT_S" in job.error
        assert request(ctx, user) != job_id  # the owner can ask again
    finally:
        stuck.set()
        worker.join(10)
