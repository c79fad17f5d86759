"""Two real API processes and real RQ workers against the real PostgreSQL and Redis (tiny model).

(a) once a retrain job has succeeded, BOTH API processes serve the new adapter version at once (every
request reads the current version from SQL: the bound is 0 s after the publish commit);
(b) SIGKILL of the worker mid-job: a new worker retries the job, which ends with exactly one new version,
while generate calls against both APIs all succeed and never go back to the old version once the new
one was seen;
(c) a data-key rotation run by the worker while the second API (which opened the user's key before) keeps
appending through it and right after: every row opens on both APIs, one key version is left, and the same client
id appended before and during the rotation stays one row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ADMIN_KEY, PG_SERVER_URL, TEST_MASTER_KEY
from tests.factories import free_port, redis_url
from tests.models import MODEL_CACHE_DIR, tiny_model_dir

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

BIN = Path(sys.executable).parent
REDIS_DB = 7  # flushed before and after: the test owns this database number
STALE_AFTER_S = 3
EPOCHS = 80  # ~8 s of training on the tiny model (more under load): the poll sees it running, a kill lands mid-job
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
GEN = {"prompt": "hello there", "max_new_tokens": 1, "temperature": 0, "retrieval_k": 0}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (RQ's work horse runs in its own process group, so killpg misses it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def kill_tree(self) -> None:
        """SIGKILL the process, its process group and everything it forked (work horses included)."""
        victims = descendants(self.popen.pid)
        for pgid in {self.popen.pid, *victims}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.popen.poll() is None or descendants(self.popen.pid):
            self.kill_tree()

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"--- {self.name} (rc={self.popen.poll()}) ---\n" + "\n".join(lines[-n:])


class Cluster:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.procs: list[Proc] = []

    def start(self, name: str, *args: str) -> Proc:
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                [str(BIN / "oppu"), *args], env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    schema = f"t_mp_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_SERVER_URL else "?"
    try:
        yield f"{PG_SERVER_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def cluster(tmp_path: Path, pg_schema_url: str) -> Iterator[Cluster]:
    from redis import Redis

    url = redis_url(REDIS_DB)
    redis = Redis.from_url(url)
    redis.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPPU_")}
    env.update(
        OPPU_DATABASE_URL=pg_schema_url,
        OPPU_REDIS_URL=url,
        OPPU_ADAPTERS_DIR=str(tmp_path / "adapters"),
        OPPU_DATA_DIR=str(tmp_path / "data"),
        OPPU_ADMIN_KEY=ADMIN_KEY,
        OPPU_MASTER_KEY=TEST_MASTER_KEY,  # every process seals under one master key (keyring: the shared data dir)
        OPPU_MODEL=str(tiny_model_dir()),
        OPPU_MODEL_CACHE_DIR=str(MODEL_CACHE_DIR),
        OPPU_DEVICE="cpu",
        OPPU_JOB_STALE_AFTER_S=str(STALE_AFTER_S),
        OPPU_TRAIN_USER_EPOCHS=str(EPOCHS),
        OPPU_TRAIN_RETRIEVAL_K="1",
        OPPU_TORCH_THREADS="1",
        OPPU_BATCH_WINDOW_MS="2",
    )
    subprocess.run([str(BIN / "oppu"), "migrate"], env=env, check=True, capture_output=True, timeout=120)
    c = Cluster(tmp_path, env)
    try:
        yield c
    finally:
        c.stop_all()
        redis.flushdb()
        redis.close()


def wait_ready(cluster: Cluster, bases: list[str], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(bases)
    while pending:
        if time.monotonic() > deadline:
            raise AssertionError(f"APIs not ready: {pending}\n{cluster.logs()}")
        for proc in cluster.procs:
            assert proc.popen.poll() is None, cluster.logs()
        try:
            if httpx.get(f"{pending[0]}/readyz", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def get_job(base: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/admin/jobs/{job_id}", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def wait_job(
    cluster: Cluster, base: str, job_id: str, *, until: tuple[str, ...], timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(base, job_id)
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {until} after {timeout} s: {job}\n{cluster.logs()}")


def generate_version(base: str, key: str) -> int | None:
    r = httpx.post(f"{base}/users/u1/generate", json=GEN, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    version: int | None = r.json()["adapter_version"]
    return version


@dataclass
class Call:
    api: int
    started: float
    ended: float
    status: int
    version: int | None


class Load:
    """Generate calls against every API, back to back (one thread per API), recorded with their times."""

    def __init__(self, bases: list[str], key: str) -> None:
        self.bases, self.key = bases, key
        self.calls: list[Call] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(bases))]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, api: int) -> None:
        with httpx.Client(base_url=self.bases[api], headers={"Authorization": f"Bearer {self.key}"}) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post("/users/u1/generate", json=GEN, timeout=30)
                    body = r.json() if r.status_code == 200 else {}
                    self.calls.append(Call(api, started, time.monotonic(), r.status_code, body.get("adapter_version")))
                    if r.status_code != 200:
                        self.errors.append(f"api{api}: {r.status_code} {r.text[:200]}")
                except Exception as exc:  # a refused connection or a timeout is a failed call too
                    self.errors.append(f"api{api}: {type(exc).__name__}: {exc}")
                self._stop.wait(0.1)


def test_two_apis_and_a_killed_worker(cluster: Cluster) -> None:
    t0 = time.monotonic()
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    for i, port in enumerate(ports):
        cluster.start(f"api{i + 1}", "serve", "--port", str(port), "--log-level", "warning")
    worker = cluster.start("worker1", "worker")
    wait_ready(cluster, bases)

    r = httpx.post(f"{bases[0]}/admin/users", json={"user_id": "u1"}, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    items = [{"id": f"i{n}", "input": f"question {n}", "output": f"answer {n} zebracorn"} for n in range(6)]
    r = httpx.post(
        f"{bases[1]}/users/u1/history", json={"items": items}, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert r.status_code == 201, r.text
    assert [generate_version(b, key) for b in bases] == [None, None]

    # (a) retrain through API 2, watch through API 1; both serve v1 as soon as the job has succeeded.
    r = httpx.post(f"{bases[1]}/admin/users/u1/retrain", headers=ADMIN, timeout=10)
    assert r.status_code == 202, r.text
    job = wait_job(cluster, bases[0], r.json()["job_id"], until=("succeeded", "failed"))
    seen_at = time.monotonic()
    assert (job["status"], job["adapter_version"], job["attempts"]) == ("succeeded", 1, 1), job
    asked = []  # the first call on each API, sent right away (no retries), already gets v1
    for base in bases:
        asked.append(time.monotonic() - seen_at)
        assert generate_version(base, key) == 1, cluster.logs()
    assert max(asked) < 1.0, asked
    t_a = time.monotonic() - t0

    # (b) retrain again; SIGKILL the worker (and its work horse) mid-training; a new worker retries it.
    with Load(bases, key) as load:
        r = httpx.post(f"{bases[0]}/admin/users/u1/retrain", headers=ADMIN, timeout=10)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 60
        while not ((job := get_job(bases[1], job_id))["status"] == "running" and job["progress"] > 0):
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, (job, cluster.logs())
            time.sleep(0.05)
        worker.kill_tree()
        killed_at = time.monotonic()
        assert get_job(bases[1], job_id)["status"] == "running"  # nobody marks it: the reaper will
        cluster.start("worker2", "worker")
        job = wait_job(cluster, bases[1], job_id, until=("succeeded", "failed"), timeout=60)
        done_at = time.monotonic()
        time.sleep(1.0)  # keep calling for a while after the new version appeared
    assert job["status"] == "succeeded", (job, cluster.logs())
    assert job["attempts"] >= 2 and job["adapter_version"] == 2, job

    r = httpx.get(f"{bases[0]}/users/u1/adapter/versions", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["current_version"] == 2
    assert sorted(v["version"] for v in r.json()["versions"]) == [1, 2]  # exactly one new version
    assert [generate_version(b, key) for b in bases] == [2, 2]
    on_disk = sorted(p.name for p in (cluster.tmp / "adapters" / "users").glob("*/*"))
    assert on_disk == ["v000001", "v000002"], on_disk  # nothing partial left by the killed attempt

    assert not load.errors, load.errors[:5]
    calls = sorted(load.calls, key=lambda c: c.started)
    assert all(c.status == 200 and c.version in (1, 2) for c in calls)
    for api in range(len(bases)):
        mine = [c for c in calls if c.api == api]
        assert any(c.started > killed_at and c.ended < done_at and c.version == 1 for c in mine), "no calls mid-episode"
        assert any(c.version == 2 for c in mine)
    first_new = min(c.ended for c in calls if c.version == 2)
    regressions = [c for c in calls if c.started > first_new and c.version == 1]
    assert not regressions, f"{len(regressions)} call(s) served v1 after v2 was seen"
    print(
        f"\n(a) at {t_a:.1f} s; kill->success {done_at - killed_at:.1f} s; {len(calls)} calls, all 200; "
        f"total {time.monotonic() - t0:.1f} s"
    )


def metric(base: str, name: str) -> float:
    text_ = httpx.get(f"{base}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text_.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, values)
    return values[0]


def two_apis_and_a_worker(cluster: Cluster) -> list[str]:
    """Two API processes and one `oppu worker` on the cluster's database; their base URLs once ready."""
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    for i, port in enumerate(ports):
        cluster.start(f"api{i + 1}", "serve", "--port", str(port), "--log-level", "warning")
    cluster.start("worker1", "worker")
    wait_ready(cluster, bases)
    return bases


def test_erase_across_two_apis_and_a_worker(cluster: Cluster, pg_schema_url: str) -> None:
    """DELETE /admin/users/{id} on one API while the user's adapter sits in both APIs' slots and a retrain of
    theirs was just queued: nothing of them remains in SQL, the store, either API's adapter slots, or the
    queue (the queued job publishes nothing), and the shared version trained on their history is flagged."""
    bases = two_apis_and_a_worker(cluster)
    keys = {}
    for user in ("eve", "other"):
        r = httpx.post(f"{bases[0]}/admin/users", json={"user_id": user}, headers=ADMIN, timeout=10)
        assert r.status_code == 201, r.text
        keys[user] = r.json()["api_key"]
        items = [{"id": f"i{n}", "input": f"q {n}", "output": f"{user} says {n}"} for n in range(4)]
        r = httpx.post(f"{bases[1]}/users/{user}/history", json={"items": items}, headers=bearer(keys[user]))
        assert r.status_code == 201, r.text
    for path in ("/admin/shared-adapter/retrain", "/admin/users/eve/retrain"):
        r = httpx.post(f"{bases[0]}{path}", headers=ADMIN, timeout=10)
        assert r.status_code == 202, r.text
        assert wait_job(cluster, bases[0], r.json()["job_id"], until=("succeeded", "failed"))["status"] == "succeeded"
    engine = create_engine(pg_schema_url)
    with engine.connect() as conn:
        eve_pk, eve_key = conn.execute(text("SELECT id, storage_key FROM users WHERE user_id = 'eve'")).one()
    eve_dir = cluster.tmp / "adapters" / "users" / eve_key
    assert eve_dir.is_dir()
    for base in bases:  # eve's adapter now sits in a slot of both APIs
        r = httpx.post(f"{base}/users/eve/generate", json=GEN, headers=bearer(keys["eve"]), timeout=30)
        assert r.status_code == 200 and r.json()["adapter_version"] == 1, r.text
        assert metric(base, "oppu_adapter_slots_in_use") == 1

    r = httpx.post(f"{bases[0]}/admin/users/eve/retrain", headers=ADMIN, timeout=10)
    assert r.status_code == 202, r.text
    queued_job = r.json()["job_id"]
    assert httpx.delete(f"{bases[1]}/admin/users/eve", headers=ADMIN, timeout=30).status_code == 204
    time.sleep(3.0)  # the queued job runs (or is dropped) and the notice reaches the other API

    with engine.connect() as conn:
        for table in ("api_keys", "history_items", "profiles", "adapter_heads", "adapters"):
            n = conn.execute(text(f"SELECT count(*) FROM {table} WHERE user_pk = :pk"), {"pk": eve_pk}).scalar()
            assert n == 0, table
        n = conn.execute(text("SELECT count(*) FROM adapter_contributors WHERE storage_key = :k"), {"k": eve_key})
        assert n.scalar() == 0  # contributors are named by storage key; the erased one is flagged, then forgotten
        assert conn.execute(text("SELECT count(*) FROM users WHERE id = :pk"), {"pk": eve_pk}).scalar() == 0
        n = conn.execute(text("SELECT count(*) FROM jobs WHERE owner_key = :k OR user_pk = :pk"),
                         {"k": eve_key, "pk": eve_pk}).scalar()  # fmt: skip
        assert n == 0
    engine.dispose()
    assert not eve_dir.exists(), list(eve_dir.rglob("*"))
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    from service.jobs.queue import QUEUE_NAME

    with Redis.from_url(redis_url(REDIS_DB)) as redis:
        waiting = Queue(QUEUE_NAME, connection=redis, serializer=JSONSerializer).job_ids
    assert not [j for j in waiting if j.startswith(queued_job)], waiting
    for base in bases:
        assert metric(base, "oppu_adapter_slots_in_use") == 0, cluster.logs()  # dropped on BOTH replicas
        r = httpx.post(f"{base}/users/eve/generate", json=GEN, headers=bearer(keys["eve"]), timeout=30)
        assert r.status_code == 401
        r = httpx.post(f"{base}/users/other/generate", json=GEN, headers=bearer(keys["other"]), timeout=30)
        assert r.status_code == 200, r.text
    r = httpx.get(f"{bases[0]}/admin/shared-adapter", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    versions = r.json()["versions"]
    assert versions and all(v["trained_on_erased"] for v in versions), versions


def test_rotation_by_the_worker_while_another_api_writes(cluster: Cluster, pg_schema_url: str) -> None:
    cluster.env["OPPU_KEY_RECHECK_S"] = "0.6"  # the rotation waits 1.6 s before re-sealing: appends on a loaded box
    bases = two_apis_and_a_worker(cluster)
    r = httpx.post(f"{bases[0]}/admin/users", json={"user_id": "ann"}, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    key = r.json()["api_key"]

    def append(base: str, item_id: str) -> httpx.Response:
        item = {"id": item_id, "input": "q", "output": f"zebracorn {item_id}"}
        return httpx.post(f"{base}/users/ann/history", json={"items": [item]}, headers=bearer(key), timeout=10)

    assert append(bases[1], "before").json()["added"] == 1  # api2 opened (and cached) ann's version-1 key
    r = httpx.post(f"{bases[0]}/admin/users/ann/keys/rotate-data-key", headers=ADMIN, timeout=10)
    assert r.status_code == 202 and r.json()["kind"] == "user_key_rotation", r.text
    job_id = r.json()["job_id"]
    n = 0
    while httpx.get(f"{bases[0]}/admin/jobs/{job_id}", headers=ADMIN, timeout=10).json()["status"] in (
        "queued",
        "running",
    ):
        assert append(bases[1], f"d{n}").status_code == 201
        if n == 3:  # the same client id again, during the rotation
            again = append(bases[1], "before")
            assert again.status_code == 201 and again.json()["duplicates"] == 1, again.text
        n += 1
        time.sleep(0.05)
    job = wait_job(cluster, bases[0], job_id, until=("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["adapter_version"] is None, (job, cluster.logs())
    assert n >= 4  # appends went on through the settle time and the sweeps (the repeated id among them)
    for i in range(3):  # right after the old key is destroyed
        assert append(bases[1], f"a{i}").status_code == 201
    for base in bases:
        r = httpx.get(f"{base}/users/ann/history", params={"limit": 1000}, headers=bearer(key), timeout=10)
        assert r.status_code == 200, r.text
        ids = [i["id"] for i in r.json()["items"]]
        assert len(ids) == len(set(ids)) == 1 + n + 3, ids
    keyring = create_engine(f"sqlite:///{cluster.tmp / 'data' / 'keyring.sqlite3'}")
    main = create_engine(pg_schema_url)
    with main.connect() as conn:
        owner = conn.execute(text("SELECT storage_key FROM users WHERE user_id = 'ann'")).scalar_one()
    with keyring.connect() as conn:
        versions = conn.execute(text("SELECT version FROM data_keys WHERE owner_key = :k"), {"k": owner}).scalars()
        assert list(versions) == [2]
    keyring.dispose()
    main.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_worker_asked_to_stop_gives_its_running_job_back(cluster: Cluster) -> None:
    """SIGTERM to `oppu worker` (what a container stop sends, to the worker only: its work horse has its own
    process group): RQ's warm shutdown waited for the job, so a training ran on until the container was killed
    and the attempt counted (three deploys mid-training failed the job). Now the job stops at its next step,
    goes back to queued with the attempt not counted, the worker exits, and a later worker runs it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cluster.start("api1", "serve", "--port", str(port), "--log-level", "warning")
    worker = cluster.start("worker1", "worker")
    wait_ready(cluster, [base])
    r = httpx.post(f"{base}/admin/users", json={"user_id": "u1"}, headers=ADMIN, timeout=10)
    key = r.json()["api_key"]
    items = [{"id": f"i{n}", "input": f"question {n}", "output": f"answer {n}"} for n in range(6)]
    r = httpx.post(f"{base}/users/u1/history", json={"items": items}, headers=bearer(key), timeout=10)
    assert r.status_code == 201, r.text
    job_id = httpx.post(f"{base}/admin/users/u1/retrain", headers=ADMIN, timeout=10).json()["job_id"]
    deadline = time.monotonic() + 60
    while not ((job := get_job(base, job_id))["status"] == "running" and job["progress"] > 0):
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, (job, cluster.logs())
        time.sleep(0.05)
    os.kill(worker.popen.pid, signal.SIGTERM)
    worker.popen.wait(timeout=30)
    job = get_job(base, job_id)
    assert (job["status"], job["attempts"], job["adapter_version"]) == ("queued", 0, None), (job, cluster.logs())
    cluster.env["OPPU_JOB_REQUEUE_AFTER_S"] = "1"  # the reaper of the next worker enqueues it again
    cluster.start("worker2", "worker")
    job = wait_job(cluster, base, job_id, until=("succeeded", "failed"), timeout=90)
    assert (job["status"], job["attempts"], job["adapter_version"]) == ("succeeded", 1, 1), (job, cluster.logs())
