"""A routing policy measured under skew (issue 22 item 4): the local cluster (scripts/cluster.py: 2 API
replicas + the real nginx, PostgreSQL, Redis) in front of the real default model, 200 users each with their own
LoRA, a Zipf(1.1) request mix over the users and adapter slots (and a host tier) smaller than the user count.

For every policy nginx is rendered from docker/nginx.conf with only its balancing rule swapped
(`cluster.py --policy`): `hash` (the deployment's rule: consistent hash by user, here on X-User-ID as a trusted
gateway sets it), `round_robin`, `least_conn` and `random_two` (power of two choices on least connections).
Each policy gets a freshly started cluster (cold caches) and the SAME seeded request list: a warm phase, then
the measured phase, streamed POST /v1/completions (fixed prompt length, `ignore_eos`, greedy), CLIENTS closed-loop
clients. Reported per policy: tok/s, TTFT p50/p99, latency p50/p99, adapter cold loads per tier (deltas of
`oppu_adapter_cache_events_total{event="load"}` read from each replica's /metrics: tier "host" = disk -> host
memory, tier "slot" = host -> device slot) with their mean load time, and each replica's share of the requests.

Usage: .venv/bin/python bench/routing_policy.py [--quick] [--policies hash,round_robin,least_conn,random_two]
       [--rounds 2] [--at-commit REV] [--out bench/results/routing_policy.json]
Every policy runs once per round, rounds interleaved (every other one reversed); --at-commit runs the replicas
on a `git archive` of REV instead of the shared working tree. The whole default run took 700 s at load 6-9.
Needs nginx (apt-get install nginx-light), PostgreSQL (OPPU_TEST_POSTGRES_URL, default the test server) and Redis.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.machine

from bench.machine import machine_record  # noqa: E402

ADMIN_KEY = "bench-routing-admin-key-0123456789abcdef"
METRICS_TOKEN = "bench-routing-metrics-token"
MASTER_KEY = "YmVuY2gtcm91dGluZy1tYXN0ZXIta2V5LTAxMjM0NTY="  # 32 bytes, base64: replicas on PostgreSQL need one
TARGETS = ("q_proj", "v_proj")
RANK = 8
PG_URL = os.environ.get("OPPU_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = "redis://127.0.0.1:6379/11"  # pub/sub notices only (no worker): nothing is stored there
WORDS = (
    "river stone garden music winter coffee letter window mountain story bread candle forest market engine "
    "planet ocean silver pencil travel cotton summer bridge lantern harbor meadow violin puzzle thunder orchard"
).split()


@dataclass(frozen=True)
class Config:
    users: int = 200
    zipf_s: float = 1.1
    requests: int = 128
    warm_requests: int = 32
    new_tokens: int = 16
    prompt_words: int = 24
    clients: int = 16
    slots: int = 8  # per replica, well under the 200 users (and under the ~100 a hashed replica serves)
    host_adapters: int = 24  # host tier budget per replica, in adapters
    batch_max_size: int = 8
    seed: int = 22


@dataclass(frozen=True)
class Req:
    user: int
    prompt: str


@dataclass
class Result:
    user: int
    status: int
    tokens: int
    latency_s: float
    ttft_s: float | None


@dataclass
class Running:
    front: str
    replicas: dict[str, str]  # name -> base URL
    pids: dict[str, int]
    run_dir: Path
    script: subprocess.Popen[bytes] = field(repr=False)


# --- workload ----------------------------------------------------------------------------------------------
def zipf_requests(cfg: Config, n: int, seed: str) -> list[Req]:
    """n requests, users drawn Zipf(s) over a seeded permutation of the users (rank 1 is not always user 0,
    so which replica the head hashes to is not an artefact of the numbering)."""
    rng = random.Random(f"{cfg.seed}-{seed}")
    order = list(range(cfg.users))
    random.Random(cfg.seed).shuffle(order)  # the same popularity ranking for every phase and policy
    weights = [1.0 / (k**cfg.zipf_s) for k in range(1, cfg.users + 1)]
    ranks = rng.choices(range(cfg.users), weights=weights, k=n)
    return [Req(order[r], " ".join(rng.choice(WORDS) for _ in range(cfg.prompt_words))) for r in ranks]


def adapter_zip(model_dir: Path, user: int) -> bytes:
    """A small random PEFT LoRA (r=8 on q/v, fp16) zipped for upload; one per user, seeded by the user."""
    import torch
    from safetensors.torch import save

    from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, make_peft_config

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out_dim = {"q_proj": hidden, "v_proj": hidden // heads * kv_heads}
    g = torch.Generator().manual_seed(1000 + user)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in TARGETS:
            name = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(RANK, hidden, generator=g) * 0.02).half()
            tensors[f"{name}.lora_B.weight"] = (torch.randn(out_dim[t], RANK, generator=g) * 0.02).half()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(WEIGHTS_NAME, save(tensors))
        zf.writestr(CONFIG_NAME, json.dumps(make_peft_config(RANK, 2 * RANK, TARGETS, None)))
    return buf.getvalue()


def adapter_host_bytes(model_dir: Path) -> int:
    """An upper bound of one adapter in the host tier (fp32 A and B), to size the budget in adapters."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = RANK * hidden * 2 + RANK * hidden + RANK * (hidden // heads * kv_heads)
    return int(4 * per_layer * cfg["num_hidden_layers"])


# --- cluster -----------------------------------------------------------------------------------------------
def free_base(replicas: int) -> int:
    for _ in range(200):
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
    raise SystemExit("no free run of ports")


@contextmanager
def cluster(policy: str, env: dict[str, str], work: Path) -> Iterator[Running]:
    run_dir = work / f"run-{policy}-{uuid.uuid4().hex[:6]}"
    args = ["--port", str(free_base(2)), "--replicas", "2", "--run-dir", str(run_dir), "--no-worker"]
    args += ["--policy", policy]
    out = work / f"cluster-{policy}.out"
    with open(out, "ab") as log:
        script = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "cluster.py"), *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        started, deadline = time.monotonic(), time.monotonic() + 300
        while not (run_dir / "ready").exists():
            if script.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"cluster ({policy}) did not start:\n{out.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        print(f"[{policy}] cluster ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        state = json.loads((run_dir / "cluster.json").read_text())
        replicas = {name: f"http://127.0.0.1:{r['port']}" for name, r in state["replicas"].items()}
        yield Running(state["front"], replicas, {n: state["pids"][n] for n in replicas}, run_dir, script)
    finally:
        if script.poll() is None:
            script.send_signal(signal.SIGINT)  # the script stops nginx and the replicas it started
            try:
                script.wait(90)
            except subprocess.TimeoutExpired:
                script.kill()
                script.wait(10)


def create_users(front: str, cfg: Config, model_dir: Path) -> list[str]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = []
    with httpx.Client(timeout=120) as http:
        for u in range(cfg.users):
            r = http.post(f"{front}/admin/users", json={"user_id": f"u{u:03d}"}, headers=admin)
            r.raise_for_status()
            keys.append(r.json()["api_key"])
            auth = {"Authorization": f"Bearer {keys[-1]}", "Content-Type": "application/zip"}
            r = http.put(f"{front}/users/u{u:03d}/adapter", content=adapter_zip(model_dir, u), headers=auth)
            r.raise_for_status()
    return keys


def scrape(url: str) -> dict[str, float]:
    """The counters this bench reads from one replica's /metrics (sample name + sorted labels -> value)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30).text
    out: dict[str, float] = {}
    wanted = ("oppu_adapter_cache_events", "oppu_adapter_swap_seconds", "oppu_http_requests", "oppu_generated_tokens")
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for s in family.samples:
            if s.name.endswith("_created") or s.name.endswith("_bucket"):
                continue
            if s.name.startswith("oppu_http_requests") and s.labels.get("route") != "/v1/completions":
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = out.get(f"{s.name}{{{labels}}}", 0.0) + s.value
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process: a figure the other tenants of a shared box distort less."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replica_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    def d(prefix: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))

    loads = {t: d(f"oppu_adapter_cache_events_total{{event=load,tier={t}}}") for t in ("host", "slot")}
    mean_ms = {}
    for t in ("host", "slot"):
        n = d(f"oppu_adapter_swap_seconds_count{{tier={t}}}")
        mean_ms[t] = round(1e3 * d(f"oppu_adapter_swap_seconds_sum{{tier={t}}}") / n, 2) if n else None
    return {
        "requests": int(d("oppu_http_requests_total{")),
        "generated_tokens": int(d("oppu_generated_tokens_total")),
        "cold_loads": {t: int(v) for t, v in loads.items()},
        "slot_hits": int(d("oppu_adapter_cache_events_total{event=hit,tier=slot}")),
        "load_ms_mean": mean_ms,
    }


# --- load --------------------------------------------------------------------------------------------------
def one(http: httpx.Client, front: str, key: str, user: int, req: Req, new_tokens: int) -> Result:
    body = {"model": "personal", "prompt": req.prompt, "max_tokens": new_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}", "X-User-ID": f"u{user:03d}"}  # as a trusted gateway sets it
    started = time.perf_counter()
    ttft, tokens = None, 0
    with http.stream("POST", f"{front}/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return Result(user, r.status_code, 0, time.perf_counter() - started, None)
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if ttft is None and any(c.get("text") for c in chunk.get("choices") or []):
                ttft = time.perf_counter() - started
    return Result(user, 200, tokens, time.perf_counter() - started, ttft)


def drive(front: str, keys: list[str], reqs: list[Req], cfg: Config) -> tuple[list[Result], float]:
    """cfg.clients closed-loop clients taking the next request of the list (the same order for every policy)."""
    results: list[Result | None] = [None] * len(reqs)
    lock, nxt = threading.Lock(), [0]

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(reqs):
                    return
                u = reqs[i].user
                try:
                    results[i] = one(http, front, keys[u], u, reqs[i], cfg.new_tokens)
                except httpx.HTTPError:
                    results[i] = Result(u, 0, 0, 0.0, None)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None], time.perf_counter() - started


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    lat = [r.latency_s for r in ok]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "errors": dict(sorted(
            {str(s): sum(1 for r in results if r.status == s) for s in {r.status for r in results} if s != 200}.items()
        )),
        "completion_tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2),
        "ttft_p50_s": r3(pct(ttft, 50)), "ttft_p99_s": r3(pct(ttft, 99)),
        "latency_p50_s": r3(pct(lat, 50)), "latency_p99_s": r3(pct(lat, 99)),
    }  # fmt: skip


def warm_engines(running: Running, key: str, base_model: str) -> None:
    """One base-model request straight to each replica (no adapter): first-step allocations out of the figures."""
    body = {"model": base_model, "prompt": "hello there", "max_tokens": 4, "temperature": 0}
    for url in running.replicas.values():
        httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def measure_policy(
    policy: str, env: dict[str, str], work: Path, keys: list[str], cfg: Config, phases: dict[str, list[Req]]
) -> dict[str, Any]:
    with cluster(policy, env, work) as running:
        models = httpx.get(f"{running.front}/v1/models", headers={"Authorization": f"Bearer {keys[0]}"}, timeout=30)
        base_model = next(m["id"] for m in models.json()["data"] if not str(m["id"]).startswith(("personal", "user:")))
        warm_engines(running, keys[0], base_model)
        out: dict[str, Any] = {"policy": policy}
        for phase, reqs in phases.items():
            before = {n: scrape(u) for n, u in running.replicas.items()}
            cpu0 = {n: cpu_seconds(pid) for n, pid in running.pids.items()}
            results, wall = drive(running.front, keys, reqs, cfg)
            cpu1 = {n: cpu_seconds(pid) for n, pid in running.pids.items()}
            after = {n: scrape(u) for n, u in running.replicas.items()}
            summary = summarize(results, wall)
            per = {n: replica_deltas(before[n], after[n]) for n in running.replicas}
            for n in per:
                per[n]["cpu_s"] = round(cpu1[n] - cpu0[n], 2)
            summary["cpu_s_per_token"] = round(
                sum(p["cpu_s"] for p in per.values()) / max(1, summary["completion_tokens"]), 4
            )
            summary["load_avg"] = [round(x, 2) for x in os.getloadavg()]
            total = sum(p["requests"] for p in per.values()) or 1
            summary["replicas"] = per
            summary["share"] = {n: round(p["requests"] / total, 3) for n, p in per.items()}
            summary["cold_loads"] = {t: sum(p["cold_loads"][t] for p in per.values()) for t in ("host", "slot")}
            summary["distinct_users"] = len({r.user for r in reqs})
            out[phase] = summary
            print(f"[{policy}] {phase}: {json.dumps(summary)}", file=sys.stderr, flush=True)
        return out


def summary_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The measured phase over the rounds: medians of the rates and percentiles, totals of the cold loads."""
    measured = [r["measured"] for r in runs]

    def med_of(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    def med(key: str) -> float | None:
        values = [m[key] for m in measured if m[key] is not None]
        return round(statistics.median(values), 3) if values else None

    replicas = sorted(measured[0]["share"])
    return {
        "tok_s": med("tok_s"), "ttft_p50_s": med("ttft_p50_s"), "ttft_p99_s": med("ttft_p99_s"),
        "latency_p99_s": med("latency_p99_s"), "cpu_s_per_token": med("cpu_s_per_token"),
        "cold_loads_per_round": {
            t: round(statistics.fmean(m["cold_loads"][t] for m in measured), 1) for t in ("host", "slot")
        },
        "share": {n: round(statistics.fmean(m["share"][n] for m in measured), 3) for n in replicas},
        # each cluster start picks new ports, so the ring (built from the replicas' addresses) and the replica
        # the Zipf head hashes to change from round to round: the mean share hides the skew, the busiest does not
        "share_each_round": [m["share"] for m in measured],
        "busiest_share": med_of([max(m["share"].values()) for m in measured]),
        "errors": sum(m["requests"] - m["ok"] for m in measured),
        "tok_s_each_round": [m["tok_s"] for m in measured],
    }  # fmt: skip


def git_state(at_commit: str | None) -> dict[str, Any]:
    """The code the replicas ran: a commit (exported), or the working tree and how far it differed from HEAD."""
    rev = at_commit or "HEAD"
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if at_commit:
        return {"code": "git archive", "commit": commit}
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], cwd=REPO, capture_output=True, text=True)
    return {"code": "working tree", "head": commit, "service_dirty_files": len(dirty.stdout.splitlines())}


def export_commit(rev: str, dest: Path) -> Path:
    """`git archive rev` into dest: the replicas import its `service` (PYTHONPATH wins over the editable install)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 users, few requests, 2 policies")
    parser.add_argument("--policies", default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument(
        "--rounds", type=int, default=None, help="runs of every policy, interleaved (default 2, --quick 1)"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--at-commit",
        default=None,
        help="run the replicas on this commit's code (git archive into the temp dir), not the shared working tree",
    )
    args = parser.parse_args()
    cfg = Config(users=40, requests=48, warm_requests=16, clients=8) if args.quick else Config()
    if args.requests:
        cfg = Config(**{**cfg.__dict__, "requests": args.requests})
    policies = (args.policies or ("hash,least_conn" if args.quick else "hash,round_robin,least_conn,random_two")).split(
        ","
    )
    load_start = [round(x, 2) for x in os.getloadavg()]
    from sqlalchemy import create_engine, text

    from bench.engine import model_dir

    model = model_dir()
    schema = f"bench_rp_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    work = Path(tempfile.mkdtemp(prefix="oppu-routing-"))
    work.chmod(0o755)  # nginx's workers (nobody, when started as root) buffer upload bodies below it
    sep = "&" if "?" in PG_URL else "?"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPPU_")}
    env.update(
        OPPU_DATABASE_URL=f"{PG_URL}{sep}options=-csearch_path%3D{schema}", OPPU_REDIS_URL=REDIS_URL,
        OPPU_ADAPTERS_DIR=str(work / "adapters"), OPPU_DATA_DIR=str(work / "data"), OPPU_ADMIN_KEY=ADMIN_KEY,
        OPPU_METRICS_TOKEN=METRICS_TOKEN, OPPU_MODEL=str(model), OPPU_DEVICE="cpu", OPPU_TORCH_THREADS="1",
        OPPU_ADAPTER_SLOTS=str(cfg.slots), OPPU_BATCH_MAX_SIZE=str(cfg.batch_max_size),
        OPPU_ADAPTER_HOST_BUDGET_BYTES=str(cfg.host_adapters * adapter_host_bytes(model)),
        OPPU_QUEUE_PER_USER_MAX="64", OPPU_REQUEST_TIMEOUT_S="600", OPPU_AUTH_MAX_FAILURES="0",
        OPPU_MASTER_KEY=MASTER_KEY,
    )  # fmt: skip
    if args.at_commit:
        env["PYTHONPATH"] = str(export_commit(args.at_commit, work / "code"))
    phases = {"warm": zipf_requests(cfg, cfg.warm_requests, "warm"), "measured": zipf_requests(cfg, cfg.requests, "m")}
    report: dict[str, Any] = {
        "bench": "routing_policy",
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/routing_policy.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_start": load_start,
        "box_loaded_at_start": load_start[0] > 2,
        "machine": machine_record(dtype="auto (OPPU_DTYPE default)"),
        "git": git_state(args.at_commit),
        "model": model.name,
        "config": cfg.__dict__
        | {
            "replicas": 2,
            "targets": list(TARGETS),
            "rank": RANK,
            "engine": "builtin",
            "torch_threads_per_replica": 1,
            "host_budget_bytes": cfg.host_adapters * adapter_host_bytes(model),
            "route": "POST /v1/completions stream",
            "routing_key": "X-User-ID (hash policy)",
        },
        "head_share": round(
            1 / sum(1 / k**cfg.zipf_s for k in range(1, cfg.users + 1)), 3
        ),  # the top user's expected share of the requests
        "policies": {},
    }
    try:
        started = time.monotonic()
        with cluster("hash", env, work) as running:  # users and adapters land in PostgreSQL + the shared store
            keys = create_users(running.front, cfg, model)
        print(f"{cfg.users} users + adapters in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        rounds = args.rounds or (1 if args.quick else 2)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
        for n in range(rounds):  # every other round in reverse order: drift in the box's load hits all alike
            for policy in policies if n % 2 == 0 else policies[::-1]:
                runs[policy].append(measure_policy(policy, env, work, keys, cfg, phases))
        report["rounds"] = rounds
        report["policies"] = {p: {"summary": summary_of(r), "rounds": r} for p, r in runs.items()}
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.monotonic() - started, 1)
    text_out = json.dumps(report, indent=2)
    print(text_out)
    out = args.out or (None if args.quick else REPO / "bench" / "results" / "routing_policy.json")
    if out is not None:
        out.write_text(text_out + "\n")
    shutil.rmtree(work, ignore_errors=True)  # ~200 MB of adapters; kept (with the logs) only when a run fails


if __name__ == "__main__":
    main()
