"""Engine benchmark through HTTP POST /v1/completions: 16 users, each with their own LoRA (r=8, q/k/v/o) on the
real default model, 16 concurrent clients, the same seeded requests for every server, greedy, fixed lengths
(ignore_eos), outputs compared token for token. Servers, each started fresh in its own process:

- builtin:    `oppu serve` on the builtin engine (.venv)
- oppu-vllm:  `oppu serve` with OPPU_ENGINE=vllm (the vLLM venv: make setup-vllm)
- vllm:       vLLM's own OpenAI server on the same model and adapters (the reference; --lora-modules)

Workloads: "mixed" (256-token prompts, 8-128 new tokens), "fixed" (128-token prompts, 64 new tokens), and
"mixed-stream" (the mixed one streamed: time to first token). JSON: tok/s (completion tokens / wall time),
TTFT p50/p99, latency p50/p99 per server and workload, the ratios to the reference, and how many completions
were identical. Usage: .venv/bin/python bench/engine.py [--servers builtin,oppu-vllm,vllm] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.llamacpp, bench.machine
USERS, CLIENTS, RANK = 16, 16, 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
VLLM_KEY = "bench-vllm-key"
WORKLOADS: dict[str, dict[str, Any]] = {
    "mixed": {"prompt_tokens": 256, "new_tokens": (8, 128), "stream": False},
    "fixed": {"prompt_tokens": 128, "new_tokens": (64, 64), "stream": False},
    "mixed-stream": {"prompt_tokens": 256, "new_tokens": (8, 128), "stream": True},
}


@dataclass(frozen=True)
class Req:
    user: int
    prompt: str
    max_tokens: int


@dataclass
class Result:
    user: int
    text: str
    tokens: int
    prompt_tokens: int
    latency_s: float
    ttft_s: float | None


def model_dir() -> Path:
    from service.config import Settings
    from service.inference.loader import resolve_model_path

    _, where = resolve_model_path(Settings(model_cache_dir=REPO / ".cache" / "models"))
    assert isinstance(where, Path)
    return where


def make_adapters(base_dir: Path, out: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dirs = []
    for k in range(USERS):
        torch.manual_seed(1000 + k)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS), init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)  # a visible but sane change of the outputs
                elif "lora_A" in name:
                    p.mul_(0.5)
        dirs.append(out / f"user{k}")
        model.save_pretrained(dirs[-1])
        base = model.unload()
    return dirs


def requests(workload: str, tokenizer: Any, per_client: int) -> list[Req]:
    """The same seeded requests for every server: prompts of an exact token length, users round-robin."""
    spec = WORKLOADS[workload]
    rng = random.Random(f"{workload}-0")
    vocab = [t for t in range(200, 40000)]
    out = []
    for i in range(CLIENTS * per_client):
        ids = rng.sample(vocab, spec["prompt_tokens"] + 8)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        trimmed = tokenizer.encode(text, add_special_tokens=False)[: spec["prompt_tokens"]]
        lo, hi = spec["new_tokens"]
        out.append(Req(i % USERS, tokenizer.decode(trimmed), rng.randint(lo, hi)))
    return out


# --- servers ---
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_python() -> Path:
    out = subprocess.run(["make", "-s", "-C", str(REPO), "--no-print-directory", "print-vllm-py"], capture_output=True)
    path = Path(out.stdout.decode().strip())
    if out.returncode or not path.is_file():
        raise SystemExit("the vLLM venv is missing: run `make setup-vllm` first")
    return path


@contextmanager
def server(
    kind: str, base: Path, adapters: list[Path], work: Path, baseline: Path | None = None, dtype: str | None = None
) -> Iterator[tuple[str, Callable[[int], dict[str, str]], Callable[[int], str]]]:
    """Start a server; yields (base url, headers for user k, model name for user k). A kind ending in "@base"
    runs our server from the `baseline` checkout (the code before a change, measured in the same run)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = REPO
    if kind.endswith("@base"):
        if baseline is None:
            raise SystemExit(f"{kind} needs --baseline-repo")
        code, kind = baseline, kind.removesuffix("@base")
    label = f"{kind}@base" if code != REPO else kind
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    if dtype is not None:
        env["OPPU_DTYPE"] = dtype
    if kind == "vllm":
        cmd = [str(vllm_python()), str(REPO / "bench" / "vllm_server.py"), "--model", str(base), "--port", str(port)]
        vllm_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(dtype or "", "float32")  # --dtype, else fp32
        cmd += ["--api-key", VLLM_KEY, "--dtype", vllm_dtype, "--max-model-len", "2048", "--no-enable-prefix-caching"]
        cmd += ["--enable-lora", "--max-loras", str(USERS), "--max-cpu-loras", str(USERS), "--max-lora-rank", str(RANK)]
        cmd += ["--max-num-seqs", str(CLIENTS), "--served-model-name", "base", "--lora-modules"]
        cmd += [f"user{k}={d}" for k, d in enumerate(adapters)]
        env |= {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_TARGET_DEVICE": "cpu"}
    else:
        python = sys.executable if kind == "builtin" else str(vllm_python())
        cmd = [python, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        env |= {
            "OPPU_DATA_DIR": str(work / label), "OPPU_MODEL": str(base), "OPPU_ADMIN_KEY": ADMIN_KEY,
            "OPPU_ENGINE": "vllm" if kind == "oppu-vllm" else "builtin", "OPPU_ADAPTER_SLOTS": str(USERS),
            "OPPU_BATCH_MAX_SIZE": str(CLIENTS), "OPPU_VLLM_PREFIX_CACHING": "false", "OPPU_VLLM_MAX_LORA_RANK": "8",
            "OPPU_VLLM_KV_CACHE_GIB": "2", "OPPU_QUEUE_PER_USER_MAX": "64", "OPPU_REQUEST_TIMEOUT_S": "1200",
        }  # fmt: skip
    with open(work / f"{label}.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=code, start_new_session=True)
    try:
        started = time.monotonic()
        wait_ready(url, proc, "/health" if kind == "vllm" else "/readyz")
        print(f"[{label}] ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        if kind == "vllm":
            yield url, lambda k: {"Authorization": f"Bearer {VLLM_KEY}"}, lambda k: f"user{k}"
        else:
            keys = upload_users(url, adapters)
            yield url, lambda k: {"Authorization": f"Bearer {keys[k]}"}, lambda k: "personal"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def any_server(
    kind: str, base: Path, adapters: list[Path], work: Path, args: argparse.Namespace
) -> Iterator[tuple[str, Callable[[int], dict[str, str]], Callable[[int], str], Extra]]:
    """Our servers, vLLM's, or llama.cpp's `llama-server` ("llama.cpp" or "llama.cpp:<dtype>": f32, bf16, q4_1;
    built once by `make setup-llama-cpp`; it batches only requests with the same LoRA settings)."""
    if kind.startswith("llama.cpp"):
        from bench.llamacpp import llama_server

        dtype = kind.partition(":")[2] or "f32"
        with llama_server(base, adapters, work, CLIENTS, dtype) as served:
            yield served
        return
    with server(kind, base, adapters, work, args.baseline_repo, args.dtype) as (url, headers, model):
        yield url, headers, model, no_extra


def wait_ready(url: str, proc: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("server did not become ready in 600 s")


def upload_users(url: str, adapters: list[Path]) -> list[str]:
    import io
    import zipfile

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = []
    for k, d in enumerate(adapters):
        r = httpx.post(f"{url}/admin/users", json={"user_id": f"user{k}"}, headers=admin, timeout=60)
        r.raise_for_status()
        keys.append(r.json()["api_key"])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in d.iterdir():
                zf.write(f, f.name)
        auth = {"Authorization": f"Bearer {keys[-1]}", "Content-Type": "application/zip"}
        httpx.put(f"{url}/users/user{k}/adapter", content=buf.getvalue(), headers=auth, timeout=120).raise_for_status()
    return keys


# --- load ---
def one(
    http: httpx.Client, url: str, headers: dict[str, str], model: str, req: Req, stream: bool, extra: dict[str, Any]
) -> Result:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True}
    body |= extra  # llama.cpp: the user's LoRA selected per request
    started = time.perf_counter()
    if not stream:
        r = http.post(f"{url}/v1/completions", json=body, headers=headers)
        r.raise_for_status()
        data = r.json()
        usage = data["usage"]
        return Result(req.user, data["choices"][0]["text"], usage["completion_tokens"], usage["prompt_tokens"],
                      time.perf_counter() - started, None)  # fmt: skip
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    ttft, text, usage = None, [], {"completion_tokens": 0, "prompt_tokens": 0}
    with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(choice["text"])
    return Result(req.user, "".join(text), usage["completion_tokens"], usage["prompt_tokens"],
                  time.perf_counter() - started, ttft)  # fmt: skip


Extra = Callable[[int], dict[str, Any]]


def no_extra(_user: int) -> dict[str, Any]:
    return {}


def drive(
    url: str,
    headers: Callable[[int], dict[str, str]],
    model: Callable[[int], str],
    reqs: list[Req],
    stream: bool,
    extra: Extra = no_extra,
) -> tuple[list[Result], float]:
    """CLIENTS threads, each sending its share of the requests one after the other."""
    results: list[Result | None] = [None] * len(reqs)
    failed: list[Exception] = []

    def client(c: int) -> None:
        try:
            with httpx.Client(timeout=1800) as http:
                for i in range(c, len(reqs), CLIENTS):
                    u = reqs[i].user
                    results[i] = one(http, url, headers(u), model(u), reqs[i], stream, extra(u))
        except Exception as exc:  # re-raised below: a workload with a failed request has no figure
            failed.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"{len(failed)} client(s) failed, first: {failed[0]!r}") from failed[0]
    assert all(r is not None for r in results)
    return [r for r in results if r is not None], wall


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    tokens = sum(r.tokens for r in results)
    lat = [r.latency_s for r in results]
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    out = {
        "requests": len(results), "completion_tokens": tokens, "prompt_tokens": sum(r.prompt_tokens for r in results),
        "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2),
        "latency_p50_s": round(pct(lat, 50), 2), "latency_p99_s": round(pct(lat, 99), 2),
    }  # fmt: skip
    if ttft:
        out |= {"ttft_p50_s": round(pct(ttft, 50), 2), "ttft_p99_s": round(pct(ttft, 99), 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="builtin,oppu-vllm,vllm")
    parser.add_argument("--workloads", default="mixed,fixed,mixed-stream")
    parser.add_argument("--per-client", type=int, default=2, help="requests per client and workload")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument(
        "--baseline-repo", type=Path, help="a checkout of the code before a change: servers named KIND@base run it"
    )
    parser.add_argument("--dtype", help="OPPU_DTYPE for our servers (default: their own default)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from bench.machine import machine_record

    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    base = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapters = make_adapters(base, work / "adapters")
    workloads = args.workloads.split(",")
    reqs = {w: requests(w, tokenizer, args.per_client) for w in workloads}
    report: dict[str, Any] = {
        "bench": "engine", "command": " ".join(["python", *sys.argv]),
        "model": base.name, "users": USERS, "clients": CLIENTS, "lora_rank": RANK,
        "machine": machine_record(args.dtype) | {"platform": platform.platform()}, "date": time.strftime("%Y-%m-%d"),
        "workloads": {w: WORKLOADS[w] | {"requests": len(reqs[w])} for w in workloads}, "servers": {},
    }  # fmt: skip
    texts: dict[str, dict[str, list[str]]] = {}
    for kind in args.servers.split(","):
        report["servers"][kind] = {}
        texts[kind] = {}
        try:
            with any_server(kind, base, adapters, work, args) as (url, headers, model, extra):
                drive(url, headers, model, reqs[workloads[0]][:CLIENTS], False, extra)  # warm-up: every adapter once
                for w in workloads:
                    results, wall = drive(url, headers, model, reqs[w], WORKLOADS[w]["stream"], extra)
                    report["servers"][kind][w] = summarize(results, wall)
                    texts[kind][w] = [r.text for r in results]
                    print(f"[{kind}] {w}: {report['servers'][kind][w]}", file=sys.stderr)
                    write(report, texts, args.out, partial=True)  # a later failure loses nothing measured
        except (Exception, SystemExit) as exc:  # one server's failure is recorded; the others still run
            report["servers"][kind]["error"] = f"{type(exc).__name__}: {exc}"
            print(f"[{kind}] failed: {exc!r}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    print(write(report, texts, args.out, partial=False))


def write(report: dict[str, Any], texts: dict[str, dict[str, list[str]]], out: str | None, *, partial: bool) -> str:
    """The report with its ratios and agreement, written to `out` (if given); `partial` while servers remain."""
    done = {kind: {w: m for w, m in runs.items() if w != "error"} for kind, runs in report["servers"].items()}
    full = report | {"partial": partial, "ratios": ratios(done), "identical_completions": identical(texts)}
    text = json.dumps(full, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    return text


def ratios(servers: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "vllm" not in servers:
        return out
    ref = servers["vllm"]
    for kind, workloads in servers.items():
        if kind == "vllm":
            continue
        out[f"{kind}/vllm"] = {
            w: {"tok_s": round(m["tok_s"] / ref[w]["tok_s"], 3)}
            | ({"ttft_p50": round(m["ttft_p50_s"] / ref[w]["ttft_p50_s"], 3)} if "ttft_p50_s" in m else {})
            for w, m in workloads.items()
            if w in ref
        }
    return out


def identical(texts: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
    kinds = list(texts)
    out: dict[str, Any] = {}
    for a in kinds:
        for b in kinds:
            if a < b:
                out[f"{a}=={b}"] = {
                    w: f"{sum(x == y for x, y in zip(texts[a][w], texts[b][w], strict=True))}/{len(texts[a][w])}"
                    for w in texts[a]
                    if w in texts[b]
                }
    return out


if __name__ == "__main__":
    main()
