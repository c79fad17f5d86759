"""`make cluster` for real (scripts/cluster.py): PostgreSQL, Redis, 2 API processes, a worker and the real nginx
rendered from docker/nginx.conf; 40 users with their own adapters (tiny model).

(a) Through a gateway that sets X-User-ID, /v1 and /users of one user land on ONE replica: each user's adapter
is loaded on exactly one replica (read from `vllm:lora_adapter_loaded` on each), users split 30-70%.
(b) Without the header, /v1 is keyed by the bearer key: every request of a key lands on one replica, keys split
30-70% (and /users, keyed by the id, lands elsewhere for about half of the users: the documented limit).
(c) SIGKILL one replica under load: every user is served by the other within 10 s, and no call fails except
those in flight on the killed one. Ctrl-C (SIGINT) to the script stops everything it started.
(d) vLLM's router (PyPI `vllm-router`, the real Rust wheel) in front of the two replicas for /v1: the bearer key
passes, a user's requests land on one replica (consistent hash on X-User-ID), and what it cannot front.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ADMIN_KEY, PG_SERVER_URL
from tests.factories import free_port, lora_zip, make_lora, samples
from tests.models import MODEL_CACHE_DIR, load_base, tiny_model_dir

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = 8  # flushed before and after: the test owns this database number
USERS = [f"user{n:02d}" for n in range(40)]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
METRICS_TOKEN = "cluster-metrics-token"
GEN = {"prompt": "hello", "max_new_tokens": 1, "temperature": 0, "retrieval_k": 0}
V1 = {"model": "personal", "prompt": "hello", "max_tokens": 1, "temperature": 0}
FAILOVER_S = 10.0
FIXED_BASE = 18700


def free_base_port(replicas: int) -> int:
    """A port with the next `replicas` ports free too (front on it, replicas above): FIXED_BASE when free, so the
    ring (built from the replicas' addresses) and the id-keyed split are the same on every run."""
    for attempt in range(200):
        base = FIXED_BASE
        if attempt:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                base = int(s.getsockname()[1])
        if base + replicas > 65535:
            continue
        try:
            for p in range(base, base + replicas + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise AssertionError("no free run of ports")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rpartition(")")[2].split()[0] != "Z"


def accepts(base: str) -> bool:
    """Whether something still accepts connections on the URL's port."""
    url = urlsplit(base)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((url.hostname or "127.0.0.1", url.port or 80)) == 0


@dataclass
class Running:
    script: subprocess.Popen[bytes]
    run_dir: Path
    front: str
    replicas: dict[str, str]  # name -> base URL
    pids: dict[str, int]

    def logs(self) -> str:
        out = []
        for log in sorted(self.run_dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-25:]
            out.append(f"--- {log.name} ---\n" + "\n".join(lines))
        return "\n".join(out)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Running]:
    from redis import Redis

    from tests.factories import redis_url

    nginx = subprocess.run(["sh", "-c", "command -v nginx || ls /usr/sbin/nginx"], capture_output=True, text=True)
    if nginx.returncode != 0:
        pytest.fail("nginx is not installed: apt-get update && apt-get install -y nginx (make cluster needs it)")
    schema = f"t_cl_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_SERVER_URL else "?"
    url = redis_url(REDIS_DB)
    redis = Redis.from_url(url)
    redis.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPPU_")}
    env.update(
        OPPU_DATABASE_URL=f"{PG_SERVER_URL}{sep}options=-csearch_path%3D{schema}",
        OPPU_REDIS_URL=url,
        OPPU_ADAPTERS_DIR=str(tmp_path / "adapters"),
        OPPU_DATA_DIR=str(tmp_path / "data"),
        OPPU_ADMIN_KEY=ADMIN_KEY,
        OPPU_METRICS_TOKEN=METRICS_TOKEN,
        OPPU_MODEL=str(tiny_model_dir()),
        OPPU_MODEL_CACHE_DIR=str(MODEL_CACHE_DIR),
        OPPU_DEVICE="cpu",
        OPPU_TORCH_THREADS="1",
        OPPU_BATCH_WINDOW_MS="2",
    )
    base = free_base_port(2)
    run_dir = tmp_path / "run"
    args = ["--port", str(base), "--replicas", "2", "--run-dir", str(run_dir)]
    with open(tmp_path / "cluster.out", "wb") as log:
        script = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "cluster.py"), *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 150
        while not (run_dir / "ready").exists():
            out = (tmp_path / "cluster.out").read_text(errors="replace")
            assert script.poll() is None, f"make cluster exited {script.returncode}:\n{out}"
            assert time.monotonic() < deadline, f"cluster not ready:\n{out}"
            time.sleep(0.3)
        state = json.loads((run_dir / "cluster.json").read_text())
        replicas = {name: f"http://127.0.0.1:{r['port']}" for name, r in state["replicas"].items()}
        yield Running(script, run_dir, state["front"], replicas, state["pids"])
    finally:
        if script.poll() is None:
            script.send_signal(signal.SIGINT)
            try:
                script.wait(timeout=60)
            except subprocess.TimeoutExpired:
                script.kill()
        redis.flushdb()
        redis.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def loaded_on(replica: str) -> set[str]:
    """The adapter names (user:<id>) resident on a replica, any level."""
    r = httpx.get(f"{replica}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return {labels["adapter_name"] for labels, _ in samples(r.text).get("vllm:lora_adapter_loaded", [])}


def within_30_70(counts: Counter[str], total: int) -> bool:
    return len(counts) == 2 and all(0.3 * total <= n <= 0.7 * total for n in counts.values())


@dataclass
class Call:
    user: str
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all


class Load:
    """Every user's /users generate and gateway-keyed /v1 calls, round robin over users, 4 threads."""

    def __init__(self, front: str, keys: dict[str, str]) -> None:
        self.front, self.keys = front, keys
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.front, timeout=30) as client:
            while not self._stop.is_set():
                with self._lock:
                    n, self._next = self._next, self._next + 1
                user = USERS[(n // 2) % len(USERS)]
                auth = {"Authorization": f"Bearer {self.keys[user]}"}
                started = time.monotonic()
                try:
                    if n % 2:
                        gateway = {**auth, "X-User-ID": user}
                        status = client.post("/v1/completions", json=V1, headers=gateway).status_code
                    else:
                        status = client.post(f"/users/{user}/generate", json=GEN, headers=auth).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.calls.append(Call(user, started, time.monotonic(), status))


def _setup_users(front: str, adapter: bytes) -> dict[str, str]:
    def one(user: str) -> tuple[str, str]:
        r = httpx.post(f"{front}/admin/users", json={"user_id": user}, headers=ADMIN, timeout=30)
        assert r.status_code == 201, r.text
        key: str = r.json()["api_key"]
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/zip"}
        for _ in range(100):  # the upload gate answers 429 while the replica takes other uploads
            r = httpx.put(f"{front}/users/{user}/adapter", content=adapter, headers=headers, timeout=60)
            if r.status_code != 429:
                break
            time.sleep(0.1)
        assert r.status_code == 201, r.text
        return user, key

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, USERS))


def _gateway_pass(front: str, keys: dict[str, str]) -> None:
    def one(user: str) -> None:
        auth = {"Authorization": f"Bearer {keys[user]}"}
        r = httpx.post(f"{front}/users/{user}/generate", json=GEN, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["adapter_version"] == 1
        r = httpx.post(f"{front}/v1/completions", json=V1, headers={**auth, "X-User-ID": user}, timeout=30)
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, USERS))


def test_cluster_spreads_users_and_survives_a_replica(cluster: Running, tmp_path: Path, tiny_model_path: Path) -> None:
    t0 = time.monotonic()
    adapter = lora_zip(make_lora(load_base(tiny_model_path), tmp_path / "lora", seed=3, r=4, targets=("q_proj",)))
    keys = _setup_users(cluster.front, adapter)
    t_setup = time.monotonic() - t0

    # (a) gateway mode: /users by id, /v1 by X-User-ID -> one replica per user.
    _gateway_pass(cluster.front, keys)
    where = {name: loaded_on(url) for name, url in cluster.replicas.items()}
    homes: dict[str, list[str]] = {u: [n for n, names in where.items() if f"user:{u}" in names] for u in USERS}
    spread = {u: h for u, h in homes.items() if len(h) != 1}
    assert not spread, f"adapters not on exactly one replica: {spread}\n{cluster.logs()}"
    by_replica = Counter(h[0] for h in homes.values())
    assert within_30_70(by_replica, len(USERS)), by_replica

    # (b) no gateway: /v1 keyed by the bearer key; each key sticks to one replica. The query string only tags
    # the call in nginx's access log (routing reads the path), which names the replica that served it.
    def by_key(n: int) -> None:
        user = USERS[n % len(USERS)]
        auth = {"Authorization": f"Bearer {keys[user]}"}
        r = httpx.post(f"{cluster.front}/v1/completions?probe={user}", json=V1, headers=auth, timeout=30)
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(by_key, range(3 * len(USERS))))
    port_name = {urlsplit(url).port: name for name, url in cluster.replicas.items()}
    served: dict[str, set[str]] = {}
    for line in (cluster.run_dir / "nginx-access.log").read_text().splitlines():
        probe = re.search(r"\?probe=(\S+) .* upstream=127\.0\.0\.1:(\d+) ", line)
        if probe:
            served.setdefault(probe[1], set()).add(port_name[int(probe[2])])
    assert set(served) == set(USERS) and all(len(s) == 1 for s in served.values()), served  # one replica per key
    key_home = {u: next(iter(s)) for u, s in served.items()}
    by_key_counts = Counter(key_home.values())
    assert within_30_70(by_key_counts, len(USERS)), by_key_counts
    same = sum(key_home[u] == homes[u][0] for u in USERS)
    t_routing = time.monotonic() - t0

    # (c) SIGKILL api1 under load; every user is served by api2 within FAILOVER_S.
    victim = "api1"
    with Load(cluster.front, keys) as load:
        time.sleep(1.5)
        os.kill(cluster.pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        # Dead = its listening socket is closed: calls sent before may fail. The pid turns zombie when the main
        # thread exits, while other threads of the process (and the socket they share) can live a few ms more.
        while pid_alive(cluster.pids[victim]) or accepts(cluster.replicas[victim]):
            assert time.monotonic() < killed_at + 5, "the killed replica did not exit"
            time.sleep(0.001)
        dead_at = time.monotonic()
        deadline = killed_at + FAILOVER_S
        while time.monotonic() < deadline:
            served_after = {c.user for c in list(load.calls) if c.started > killed_at and c.status == 200}
            if served_after >= set(USERS):
                break
            time.sleep(0.2)
        time.sleep(0.5)
    calls = list(load.calls)
    in_flight = [c for c in calls if c.started <= dead_at and c.ended >= killed_at]
    failed = [c for c in calls if c.status != 200 and c not in in_flight]
    assert not failed, (failed[:5], cluster.logs())
    assert all(c.status in (200, 502, 0) for c in in_flight), in_flight
    first_ok: dict[str, float] = {}
    for c in sorted(calls, key=lambda c: c.ended):
        if c.started > killed_at and c.status == 200:
            first_ok.setdefault(c.user, c.ended - killed_at)
    missing = set(USERS) - first_ok.keys()
    assert not missing, f"not served within {FAILOVER_S} s of the kill: {sorted(missing)}"
    assert max(first_ok.values()) <= FAILOVER_S, first_ok
    survivor = loaded_on(cluster.replicas["api2"])
    assert {f"user:{u}" for u in USERS} <= survivor  # api1's users now loaded on api2
    before_kill = [c for c in calls if c.ended < killed_at]
    assert before_kill and all(c.status == 200 for c in before_kill)

    # Ctrl-C stops everything the script started.
    cluster.script.send_signal(signal.SIGINT)
    cluster.script.wait(timeout=60)
    assert cluster.script.returncode == 0
    assert not [name for name, pid in cluster.pids.items() if pid_alive(pid)]
    print(
        f"\nsetup {t_setup:.1f} s; users per replica (gateway) {dict(by_replica)}, by key {dict(by_key_counts)}; "
        f"/v1-by-key on the id's replica for {same}/{len(USERS)} users; routing phases at {t_routing:.1f} s; "
        f"{len(calls)} calls under the kill (exit {1000 * (dead_at - killed_at):.0f} ms after SIGKILL), "
        f"{len(in_flight)} in flight on it "
        f"({sum(c.status != 200 for c in in_flight)} failed); slowest user back after {max(first_ok.values()):.2f} s; "
        f"total {time.monotonic() - t0:.1f} s"
    )


@pytest.fixture
def vllm_router(cluster: Running, tmp_path: Path) -> Iterator[str]:
    binary = Path(sys.executable).parent / "vllm-router"
    if not binary.exists():
        pytest.fail(f"{binary} missing: pip install vllm-router==0.1.17 (the .[dev] extra installs it)")
    port, metrics_port = free_port(), free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(metrics_port), "--policy"]
    args += ["consistent_hash", "--log-level", "warning", "--worker-urls", *cluster.replicas.values()]
    with open(tmp_path / "vllm-router.log", "wb") as log:
        router = subprocess.Popen([str(binary), *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # it waits for every worker's GET /health first
            assert router.poll() is None, (tmp_path / "vllm-router.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "vllm-router.log").read_text()
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(router.pid, signal.SIGTERM)
        router.wait(timeout=30)


def v1_requests(replica: str) -> float:
    r = httpx.get(f"{replica}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    series = samples(r.text).get("oppu_http_requests_total", [])
    return sum(v for labels, v in series if labels["route"] == "/v1/completions")


def test_vllm_router_fronts_v1_by_user(cluster: Running, vllm_router: str) -> None:
    users = USERS[:8]
    keys = {}
    for user in users:
        r = httpx.post(f"{cluster.front}/admin/users", json={"user_id": user}, headers=ADMIN, timeout=30)
        assert r.status_code == 201, r.text
        keys[user] = r.json()["api_key"]
    homes: dict[str, str] = {}
    for user in users:
        before = {n: v1_requests(url) for n, url in cluster.replicas.items()}
        for _ in range(3):
            headers = {"Authorization": f"Bearer {keys[user]}", "X-User-ID": user}
            r = httpx.post(f"{vllm_router}/v1/completions", json=V1, headers=headers, timeout=30)
            # The key passed (a wrong one is 401, below); the fields 0.1.17 adds to the body at their neutral
            # values pass our strict parameter check (openai_compat.service.NEUTRAL_DEFAULTS).
            assert r.status_code == 200, r.text
        delta = {n: v1_requests(url) - before[n] for n, url in cluster.replicas.items()}
        assert sorted(delta.values()) == [0, 3], (user, delta)  # every request of the user on one replica
        homes[user] = max(delta, key=lambda n: delta[n])
    assert len(set(homes.values())) == 2, homes  # users spread over both replicas
    wrong = httpx.post(f"{vllm_router}/v1/completions", json=V1, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401  # the router forwards Authorization; our replicas decide
    # What it cannot front: other paths are proxied without Authorization, non-JSON bodies are refused.
    auth = {"Authorization": f"Bearer {keys[users[0]]}"}
    r = httpx.post(f"{vllm_router}/users/{users[0]}/generate", json=GEN, headers=auth, timeout=30)
    assert r.status_code == 401, r.text
    r = httpx.put(f"{vllm_router}/users/{users[0]}/adapter", content=b"PK\x03\x04", headers=auth, timeout=30)
    assert r.status_code == 400 and "Invalid JSON body" in r.text, r.text
    print(f"\nvllm-router: users per replica {dict(Counter(homes.values()))}")
