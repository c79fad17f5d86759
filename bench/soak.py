"""Soak (issue 6, reliability item 4); prints ONE JSON object.

A real server (`oppu serve`, its own process, 127.0.0.1 only) on SQLite with the tiny test model (or the
default model with --model default) and 8 adapter slots; 200 users, each with a distinct small random
adapter uploaded through the API; then 64 concurrent clients for --seconds (300 in the issue) doing mixed
history appends and greedy generates for random users. Reports: requests, 5xx (must be 0), lost history
rows (every 201 append's `added`, summed per user, against the HTTP listing and a SQL count at the end:
must be 0), greedy outputs of a sample of users recorded before the load and again after it, i.e. after
many evictions (must be identical), the server's RSS at the end of the warm-up vs at the end (< 5%),
throughput, latency p50/p99 and the adapter cache's events from /metrics.

Usage: .venv/bin/python bench/soak.py [--seconds 300] [--clients 64] [--users 200] [--model tiny|default]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/soak.py` from anywhere: tests.* and service.* importable

from service.config import Settings  # noqa: E402
from tests.factories import random_lora_zip  # noqa: E402
from tests.models import MODEL_CACHE_DIR, tiny_model_dir  # noqa: E402

PROMPT = "Tell me what I should cook tonight, in one sentence."
WORDS = "apple river blue quiet engine garden paper silver window orange music forest candle number".split()
TARGETS = ("q_proj", "v_proj")
RANK = 4


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """The served model's decoder Linear shapes (as the server's validator sees them), from its config only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from service.adapters.validation import BaseModelSpec

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return dict(BaseModelSpec.from_model(model, model_dir.name).linear_shapes)


class Server:
    """`oppu serve` in its own process, on 127.0.0.1, with the settings given as OPPU_* variables."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        cmd = [str(REPO / ".venv/bin/oppu"), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--log-level", "warning"]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=workdir, env={**os.environ, **env}, stdout=self._log, stderr=self._log)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


class Stats:
    """What the clients saw, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter[str] = Counter()  # "op status"
        self.errors: Counter[str] = Counter()  # exceptions (timeouts, resets)
        self.added: Counter[str] = Counter()  # user -> rows the server said it added (201s)

    def record(self, op: str, seconds: float, status: int) -> None:
        with self.lock:
            self.latencies[op].append(seconds)
            self.statuses[f"{op} {status}"] += 1


def greedy_body(n: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_new_tokens": n, "temperature": 0, "retrieval_k": 0, "use_profile": False}


def greedy_outputs(http: httpx.Client, keys: Mapping[str, str], users: list[str], n: int) -> dict[str, list[str]]:
    """Each sampled user's greedy text with their adapter, and the base model's (use_adapter false)."""
    out: dict[str, list[str]] = {}
    for user in users:
        auth = {"Authorization": f"Bearer {keys[user]}"}
        texts = []
        for use_adapter in (True, False):
            r = http.post(f"/users/{user}/generate", json={**greedy_body(n), "use_adapter": use_adapter}, headers=auth)
            r.raise_for_status()
            texts.append(r.json()["text"])
        out[user] = texts
    return out


def client_loop(base_url: str, keys: Mapping[str, str], stats: Stats, deadline: float, seed: int, new: int) -> None:
    """One client: until the deadline, a history append (1-3 items) or a greedy generate for a random user."""
    rng = random.Random(seed)
    users = sorted(keys)
    body: dict[str, object]  # a JSON request body: a history append or a generate
    with httpx.Client(base_url=base_url, timeout=120) as http:
        while time.monotonic() < deadline:
            user = rng.choice(users)
            auth = {"Authorization": f"Bearer {keys[user]}"}
            if rng.random() < 0.5:
                op = "append"
                items = [{"output": " ".join(rng.choices(WORDS, k=8))} for _ in range(rng.randint(1, 3))]
                url, body = f"/users/{user}/history", {"items": items}
            else:
                op = "generate"
                url = f"/users/{user}/generate"
                body = {**greedy_body(new), "prompt": " ".join(rng.choices(WORDS, k=6)), "retrieval_k": 2}
            start = time.perf_counter()
            try:
                r = http.post(url, json=body, headers=auth)
            except httpx.HTTPError as exc:
                with stats.lock:
                    stats.errors[f"{op} {type(exc).__name__}"] += 1
                continue
            stats.record(op, time.perf_counter() - start, r.status_code)
            if op == "append" and r.status_code == 201:
                with stats.lock:
                    stats.added[user] += int(r.json()["added"])


def history_count(http: httpx.Client, user: str, key: str) -> int:
    total, cursor = 0, None
    for _ in range(10_000):  # bounded: 1000 per page
        params: dict[str, Any] = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        r = http.get(f"/users/{user}/history", params=params, headers={"Authorization": f"Bearer {key}"})
        r.raise_for_status()
        page = r.json()
        total += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    return total


def cache_events(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "oppu_adapter_cache_events_total":
                out[f"{sample.labels['event']}_{sample.labels['tier']}"] = sample.value
    return dict(sorted(out.items()))


class RssMonitor(threading.Thread):
    """Samples the server's RSS every second: the value at the end of the warm-up and the last one."""

    def __init__(self, pid: int, warm_at: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.warm_at = pid, warm_at
        self.stop = threading.Event()
        self.warm: int | None = None
        self.last = 0
        self.peak = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.last = rss_bytes(self.pid)
            self.peak = max(self.peak, self.last)
            if self.warm is None and time.monotonic() >= self.warm_at:
                self.warm = self.last


def settings_env(args: argparse.Namespace, work: Path, model: str, host_budget_bytes: int) -> dict[str, str]:
    admin_key = "soak-admin-" + secrets.token_urlsafe(16)
    env = {
        "OPPU_DATA_DIR": str(work / "data"),
        "OPPU_DATABASE_URL": f"sqlite:///{work / 'oppu.sqlite3'}",
        "OPPU_ADAPTERS_DIR": str(work / "adapters"),
        "OPPU_MODEL": model,
        "OPPU_MODEL_CACHE_DIR": str(MODEL_CACHE_DIR),
        "OPPU_ADMIN_KEY": admin_key,
        "OPPU_ADAPTER_SLOTS": str(args.slots),
        "OPPU_MAX_NEW_TOKENS_CAP": str(max(args.new_tokens, args.check_tokens)),
        "OPPU_DEFAULT_MAX_NEW_TOKENS": str(args.new_tokens),
        "OPPU_AUTH_MAX_FAILURES": "0",
        "OPPU_DOCS_ENABLED": "false",
    }
    if host_budget_bytes:
        env["OPPU_ADAPTER_HOST_BUDGET_BYTES"] = str(host_budget_bytes)
    return env


def setup_users(http: httpx.Client, admin: str, n: int, shapes: Mapping[str, tuple[int, int]]) -> dict[str, str]:
    """n users, each with a distinct random adapter uploaded through the API; user -> key."""
    keys: dict[str, str] = {}
    for i in range(n):
        user = f"soak{i:03d}"
        r = http.post("/admin/users", json={"user_id": user}, headers={"Authorization": f"Bearer {admin}"})
        r.raise_for_status()
        keys[user] = r.json()["api_key"]
        data = random_lora_zip(shapes, None, seed=10_000 + i, rank=RANK, targets=TARGETS, scale=0.5)
        headers = {"Authorization": f"Bearer {keys[user]}", "Content-Type": "application/zip"}
        r = http.put(f"/users/{user}/adapter", content=data, headers=headers)
        if r.status_code != 201:
            raise RuntimeError(f"upload for {user}: {r.status_code} {r.text}")
    return keys


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="oppu-soak-"))
    if args.model == "tiny":
        model, model_dir = str(tiny_model_dir()), tiny_model_dir()
    else:  # the default GGUF, converted once into the test model cache (the server finds it there)
        from service.inference.loader import resolve_model_path

        model = Settings().model
        model_dir = Path(resolve_model_path(Settings(model_cache_dir=MODEL_CACHE_DIR))[1])
    shapes = linear_shapes(model_dir)
    adapter_bytes = sum(4 * RANK * (d_in + d_out) for p, (d_in, d_out) in shapes.items() if p.endswith(TARGETS))
    env = settings_env(args, work, model, args.host_adapters * adapter_bytes)
    server = Server(work, env)
    try:
        server.wait_ready()
        log(f"server ready on {server.base_url} (pid {server.proc.pid}); work dir {work}")
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            keys = setup_users(http, env["OPPU_ADMIN_KEY"], args.users, shapes)
            sample = sorted(random.Random(1).sample(sorted(keys), args.sample))
            before = greedy_outputs(http, keys, sample, args.check_tokens)
            metrics_before = cache_events(http.get("/metrics").text)
            log(f"{len(keys)} users with adapters; load: {args.clients} clients for {args.seconds} s")
            stats = Stats()
            start = time.monotonic()
            deadline = start + args.seconds
            monitor = RssMonitor(server.proc.pid, start + min(60.0, args.seconds / 5))
            monitor.start()
            threads = [
                threading.Thread(
                    target=client_loop, args=(server.base_url, keys, stats, deadline, 1000 + i, args.new_tokens)
                )
                for i in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            monitor.stop.set()
            monitor.join()
            rss_end = rss_bytes(server.proc.pid)
            log("load done; checking greedy outputs, history counts and metrics")
            after = greedy_outputs(http, keys, sample, args.check_tokens)
            found = {u: history_count(http, u, k) for u, k in keys.items()}
            metrics_after = cache_events(http.get("/metrics").text)
        sql_rows = sql_history_rows(work / "oppu.sqlite3")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return report(args, stats, elapsed, before, after, found, sql_rows, monitor, rss_end, metrics_before, metrics_after)


def sql_history_rows(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM history_items").fetchone()[0])


def report(
    args: argparse.Namespace,
    stats: Stats,
    elapsed: float,
    before: dict[str, list[str]],
    after: dict[str, list[str]],
    found: dict[str, int],
    sql_rows: int,
    monitor: RssMonitor,
    rss_end: int,
    metrics_before: dict[str, float],
    metrics_after: dict[str, float],
) -> dict[str, Any]:
    codes: Counter[int] = Counter()
    for key, n in stats.statuses.items():
        codes[int(key.split()[1])] += n
    requests = sum(codes.values())
    lost = sum(max(0, stats.added[u] - found[u]) for u in found)
    extra = sum(max(0, found[u] - stats.added[u]) for u in found)
    all_lat = [x for v in stats.latencies.values() for x in v]
    warm = monitor.warm or rss_end
    growth = 100.0 * (rss_end - warm) / warm if warm else 0.0
    evictions = {k: v - metrics_before.get(k, 0.0) for k, v in metrics_after.items()}
    identical = sum(before[u] == after[u] for u in before)
    result: dict[str, Any] = {
        "model": args.model,
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "users_with_adapters": args.users,
        "adapter_slots": args.slots,
        "host_tier_adapters": args.host_adapters,
        "requests": requests,
        "by_op_status": dict(sorted(stats.statuses.items())),
        "client_exceptions": dict(stats.errors),
        "server_errors_5xx": sum(n for c, n in codes.items() if c >= 500),
        "history_rows_acknowledged": sum(stats.added.values()),
        "history_rows_listed": sum(found.values()),
        "history_rows_sql": sql_rows,
        "lost_history_rows": lost,
        "unexpected_extra_rows": extra,
        "greedy_sample_users": len(before),
        "greedy_identical_after_evictions": identical,
        "greedy_distinct_adapter_outputs": len({v[0] for v in before.values()}),
        "greedy_outputs_differing_from_base": sum(v[0] != v[1] for v in before.values()),
        "rss_warm_mb": round(warm / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_peak_mb": round(monitor.peak / 2**20, 1),
        "rss_growth_pct": round(growth, 2),
        "rss_warmup_s": round(min(60.0, args.seconds / 5), 1),
        "throughput_rps": round(requests / elapsed, 1),
        "latency_ms": {"p50": round(pct(all_lat, 0.5) * 1e3, 1), "p99": round(pct(all_lat, 0.99) * 1e3, 1)},
        "latency_ms_by_op": {
            op: {
                "p50": round(pct(v, 0.5) * 1e3, 1),
                "p99": round(pct(v, 0.99) * 1e3, 1),
                "mean": round(statistics.fmean(v) * 1e3, 1),
            }
            for op, v in sorted(stats.latencies.items())
        },
        "cache_events_during_load": evictions,
        "cache_evictions_during_load": sum(v for k, v in evictions.items() if k.startswith("evict")),
    }
    result["pass"] = (
        result["server_errors_5xx"] == 0
        and lost == 0
        and extra == 0
        and sql_rows == sum(stats.added.values())
        and identical == len(before)
        and growth < 5.0
        and not stats.errors
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--new-tokens", type=int, default=8, help="max_new_tokens of the load's generates")
    parser.add_argument("--check-tokens", type=int, default=16, help="max_new_tokens of the greedy check")
    parser.add_argument("--sample", type=int, default=16, help="users whose greedy output is compared")
    parser.add_argument(
        "--host-adapters", type=int, default=50, help="host-tier budget in adapters (0: server default, all fit)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (database, store, server.log)")
    args = parser.parse_args()
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
