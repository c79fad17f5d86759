"""Bench: does bf16 cost quality against fp32? (issue 18 item 1: the check that decides whether `OPPU_DTYPE=auto`
may pick bf16; thresholds and their reasons in docs/dtype.md).

Two parts, on the real default model (SmolLM2-135M-Instruct):

1. tokens: the builtin engine (the server's path: BuiltinEngine with LoRA slots and the adapter cache, requests
   through its public `stream`) serves a fixed prompt set in fp32 and in bf16, greedy, each request with one of
   16 users' seeded r=8 q/k/v/o LoRAs (bench/engine.py's adapters). Prompts: MovieLens rating prompts built by
   service/prompts.py (k=1 retrieval over the user's history, the dev items of the activity preset's users),
   profile prompts (build_profile_prompt over the user's last history items) and free-text prompts.
   - greedy text exact-match rate: the bf16 completion's text == the fp32 one's;
   - teacher forced on the fp32 completion (so positions line up; the executor's prefill, one chunk per row):
     top-1 agreement (bf16's argmax == fp32's greedy token) at every completion position, and the mean / p99
     |logprob_bf16 - logprob_fp32| of the fp32-chosen tokens. The same figures for fp32 teacher-forced
     against fp32 as served (decode path) give the floor that numerics alone set within one dtype.
2. eval: `oppu eval movielens` (the evaluation runner, whole pipeline: profiles, shared LoRA, per-user LoRAs
   trained under the dtype's rule, every method) at a small dev configuration, once with OPPU_DTYPE=float32
   and once with OPPU_DTYPE=bfloat16; MAE per method with a user-level bootstrap CI for each dtype and for the
   paired difference bf16 - fp32 (service/evaluation/stats.paired_ci).

Usage (prints and writes one JSON with the machine record and the command):
  .venv/bin/python bench/dtype_quality.py [--parts tokens,eval] [--eval-dir DIR] [--reuse-eval]
    [--out bench/results/dtype_quality.json]
On a shared, loaded 2-core box OMP_NUM_THREADS=1 keeps torch's threads from spinning against other processes
(the figures do not depend on it: both dtypes run under the same setting, recorded in machine.torch_threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/dtype_quality.py` from anywhere: bench.* and service.* importable

from bench.engine import RANK, TARGETS, USERS, make_adapters, model_dir  # noqa: E402
from bench.machine import machine_record  # noqa: E402
from service.adapters.cache import AdapterCache  # noqa: E402
from service.adapters.slots import LoraSlots  # noqa: E402
from service.config import Settings  # noqa: E402
from service.engine.base import collect  # noqa: E402
from service.engine.builtin.engine import BuiltinEngine  # noqa: E402
from service.engine.builtin.executor import Chunk, Executor, StepBatch, head_dim  # noqa: E402
from service.engine.builtin.kv import KVLanes  # noqa: E402
from service.engine.types import AdapterRef, EngineRequest, SamplingParams  # noqa: E402
from service.evaluation import movielens as ml  # noqa: E402
from service.evaluation.stats import paired_ci  # noqa: E402
from service.inference.loader import LoadedModel, load_model  # noqa: E402
from service.inference.tokens import encode_prompt, stop_token_ids  # noqa: E402
from service.prompts import build_profile_prompt, build_prompt  # noqa: E402
from service.retrieval.bm25 import BM25Index, doc_terms  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "movielens-latest-small"
DTYPES = ("float32", "bfloat16")
RATING_PROMPTS_PER_USER = 2
PROFILE_ITEMS = 8
NEW_TOKENS = {"rating": 8, "profile": 48, "free": 48}
FREE_PROMPTS = (
    "Recommend one movie for a rainy Sunday afternoon and say why in two sentences.",
    "Write a short review of a science-fiction film you liked.",
    "What makes a comedy funny? Answer in three sentences.",
    "Describe your ideal evening at the cinema.",
    "List three classic films everyone should see, with one line each.",
    "Explain the difference between a thriller and a horror movie.",
    "Write a two-sentence plot for a new animated film.",
    "Which movie soundtrack do you remember best, and why?",
)
# The eval's small dev configuration: a few minutes per dtype on a 2-core box.
EVAL_ARGS = (
    "--users", "8", "--items", "24", "--test-items", "4", "--split", "dev", "--set", "shared_max_per_user=4",
)  # fmt: skip
# The rule of docs/dtype.md (reasons there): bf16 may be the default where all of these hold.
THRESHOLDS = {"top1_agreement_min": 0.95, "mean_abs_dlogprob_max": 0.05, "p99_abs_dlogprob_max": 0.5}
MAE_MARGIN = 0.1  # stars: the upper end of the 95% CI of bf16 - fp32 dev MAE must not exceed it
HEADLINE = "oppu_rag_ev"  # the reference method (user LoRA + retrieval) in its expected-value readout


@dataclass(frozen=True)
class Item:
    """A history item as the prompt builder and BM25 see it."""

    id: str
    input: str | None
    output: str
    kind: str | None = "rating"


@dataclass(frozen=True)
class Prompt:
    user: int  # which of the 16 adapters serves it
    kind: str  # rating | profile | free
    text: str


def prompt_set(data: Path) -> list[Prompt]:
    """The fixed, seeded prompt set: per user 2 rating prompts; a profile prompt for every even user and a
    free-text prompt for every odd one (48 prompts, every adapter serving 3)."""
    task = ml.build_rating_task(
        ml.load_movielens(data), n_users=20, history_items=24, test_items=8, min_ratings=216, seed=0, holdout=8
    )
    out: list[Prompt] = []
    for u, split in enumerate(task.users[:USERS]):
        items = [Item(h.item_id, ml.item_input(h), ml.format_rating(h.rating)) for h in split.history]
        index = BM25Index.from_terms(doc_terms(items))
        for test in split.test[:RATING_PROMPTS_PER_USER]:
            request = ml.item_input(test)
            retrieved = [items[h.index] for h in index.top_k(request, 1)]
            out.append(Prompt(u, "rating", build_prompt(request, retrieved)))
        if u % 2 == 0:
            out.append(Prompt(u, "profile", build_profile_prompt(items[-PROFILE_ITEMS:])))
    out.extend(Prompt(2 * i + 1, "free", text) for i, text in enumerate(FREE_PROMPTS))
    return out


@dataclass
class Served:
    """One dtype's answers: per prompt the greedy tokens and their logprobs as served, and teacher-forced
    on the fp32 completion, the argmax and the logprob of the fp32 token at every position."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    forced_argmax: list[list[int]]
    forced_logprob: list[list[float]]
    forced_margin: list[list[float]]  # top-1 minus top-2 logprob (how close the decision was)
    seconds: float


def build_engine(lm: LoadedModel, slots: LoraSlots, cache: AdapterCache) -> BuiltinEngine:
    s = Settings()
    return BuiltinEngine(
        lm, cache, slots, max_rows=USERS, max_model_len=2048, max_batch_tokens=s.max_batch_tokens,
        window_s=s.batch_window_ms / 1000.0, queue_max=1024, queue_per_tenant=1024, max_scale=s.adapter_max_scale,
    )  # fmt: skip


def serve(engine: BuiltinEngine, lm: LoadedModel, prompts: Sequence[Prompt], refs: Sequence[AdapterRef]) -> list[Any]:
    stops = stop_token_ids(lm.tokenizer, lm.model.config)

    async def run_all() -> list[Any]:
        async def one(i: int, p: Prompt) -> Any:
            params = SamplingParams(max_new_tokens=NEW_TOKENS[p.kind], stop_token_ids=stops, logprobs=0)
            req = EngineRequest(
                f"q{i}", tuple(encode_prompt(lm.tokenizer, p.text)), params, refs[p.user], f"u{p.user}",
                time.monotonic() + 1800,
            )  # fmt: skip
            return await collect(engine, req)

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(run_all())


@torch.no_grad()
def teacher_forced(
    lm: LoadedModel, slots: LoraSlots, cache: AdapterCache, prompt: list[int], cont: list[int], ref: AdapterRef
) -> tuple[list[int], list[float], list[float]]:
    """The executor's prefill of prompt + cont as one chunk, logits at every position that predicts a cont
    token: (argmax, logprob of the cont token, top-1 minus top-2 logprob) per position."""
    if not cont:
        return [], [], []
    cfg = lm.model.config
    n = len(prompt) + len(cont)
    kv = KVLanes(
        layers=int(cfg.num_hidden_layers), lanes=1, kv_heads=int(cfg.num_key_value_heads), head_dim=head_dim(cfg),
        capacity=n, device=lm.device, dtype=lm.dtype,
    )  # fmt: skip
    (slot,) = cache.acquire([ref])
    try:
        batch = StepBatch(
            [*prompt, *cont], list(range(n)), [0] * n, list(range(n)), [],
            [Chunk(start=0, length=n, lane=0, pos=0, slot=slot)], list(range(len(prompt) - 1, n - 1)),
        )  # fmt: skip
        logprobs = torch.log_softmax(Executor(lm.model, kv, slots).forward(batch), dim=-1)
    finally:
        cache.release([ref])
    top2 = logprobs.topk(2, dim=-1).values
    chosen = logprobs.gather(1, torch.tensor(cont).unsqueeze(1))[:, 0]
    return logprobs.argmax(-1).tolist(), chosen.tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def run_dtype(dtype: str, prompts: Sequence[Prompt], adapters: Sequence[Path], reference: Served | None) -> Served:
    lm = load_model(Settings(model_cache_dir=REPO / ".cache" / "models", device="cpu", dtype=dtype))
    slots = LoraSlots(lm.model, USERS, RANK, TARGETS, device=lm.device, dtype=lm.dtype)
    cache = AdapterCache(slots, host_budget_bytes=256 << 20, max_scale=Settings().adapter_max_scale)
    refs = [AdapterRef(f"user{k}", 1, f"{k:064x}", d) for k, d in enumerate(adapters)]
    engine = build_engine(lm, slots, cache)
    engine.start()
    started = time.perf_counter()
    try:
        done = serve(engine, lm, prompts, refs)
    finally:
        engine.stop()
    seconds = time.perf_counter() - started
    tokens = [c.token_ids for c in done]
    served = Served(
        tokens=tokens,
        logprobs=[[float(e.logprob) for e in c.tokens] for c in done],
        texts=[lm.tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
        forced_argmax=[],
        forced_logprob=[],
        forced_margin=[],
        seconds=round(seconds, 2),
    )
    conts = reference.tokens if reference is not None else tokens  # teacher forced on the fp32 completion
    for p, cont in zip(prompts, conts, strict=True):
        ids = encode_prompt(lm.tokenizer, p.text)
        argmax, logprob, margin = teacher_forced(lm, slots, cache, ids, cont, refs[p.user])
        served.forced_argmax.append(argmax)
        served.forced_logprob.append(logprob)
        served.forced_margin.append(margin)
    return served


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] if ordered else float("nan")


def compare(
    kinds: Sequence[str], ref_tokens: Sequence[Sequence[int]], ref_lp: Sequence[Sequence[float]], other: Served,
    texts: tuple[Sequence[str], Sequence[str]] | None, margins: Sequence[Sequence[float]],
) -> dict[str, Any]:  # fmt: skip
    """Top-1 agreement and |delta logprob| of `other` (teacher forced) against the reference tokens/logprobs,
    overall and per prompt kind."""
    out: dict[str, Any] = {}
    for kind in ("all", *dict.fromkeys(kinds)):
        rows = [i for i, k in enumerate(kinds) if kind in ("all", k)]
        agree = [a == t for i in rows for a, t in zip(other.forced_argmax[i], ref_tokens[i], strict=True)]
        deltas = [abs(x - y) for i in rows for x, y in zip(other.forced_logprob[i], ref_lp[i], strict=True)]
        flips = [
            m for i in rows for m, a, t in zip(margins[i], other.forced_argmax[i], ref_tokens[i], strict=True) if a != t
        ]
        block: dict[str, Any] = {
            "prompts": len(rows),
            "positions": len(agree),
            "top1_agreement": round(sum(agree) / len(agree), 4),
            "mean_abs_dlogprob": float(f"{statistics.fmean(deltas):.4g}"),
            "p99_abs_dlogprob": float(f"{p99(deltas):.4g}"),
            "max_abs_dlogprob": float(f"{max(deltas):.4g}"),
            # fp32's own top-1 minus top-2 logprob where the argmax flipped: small = a near tie.
            "fp32_margin_at_flips_median": round(statistics.median(flips), 4) if flips else None,
        }
        if texts is not None:
            block["greedy_text_exact_match"] = round(sum(texts[0][i] == texts[1][i] for i in rows) / len(rows), 4)
        out[kind] = block
    return out


def tokens_part(data: Path) -> dict[str, Any]:
    prompts = prompt_set(data)
    with tempfile.TemporaryDirectory(prefix="oppu-dtype-") as tmp:
        adapters = make_adapters(model_dir(), Path(tmp))
        fp32 = run_dtype("float32", prompts, adapters, None)
        bf16 = run_dtype("bfloat16", prompts, adapters, fp32)
    kinds = [p.kind for p in prompts]
    margins = fp32.forced_margin
    return {
        "prompts": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
        "max_new_tokens": NEW_TOKENS,
        "adapters": f"{USERS} users, seeded random r={RANK} {'/'.join(TARGETS)} LoRAs (bench/engine.make_adapters)",
        "serve_seconds": {"float32": fp32.seconds, "bfloat16": bf16.seconds},
        "bf16_vs_fp32": compare(kinds, fp32.tokens, fp32.forced_logprob, bf16, (fp32.texts, bf16.texts), margins),
        # The floor: fp32 teacher forced (prefill path) against fp32 as served (decode path, batched rows).
        "fp32_prefill_vs_fp32_served": compare(kinds, fp32.tokens, fp32.logprobs, fp32, None, margins),
        "examples": [
            {"kind": p.kind, "user": p.user, "fp32": a, "bf16": b}
            for p, a, b in zip(prompts, fp32.texts, bf16.texts, strict=True)
            if a != b
        ][:6],
    }


# --- part 2: the evaluation runner in both dtypes ---


def eval_command(dtype: str, out: Path, data: Path) -> list[str]:
    where = [] if data == DATA else ["--data", str(data)]  # the runner's default folder is DATA
    return [
        str(REPO / ".venv" / "bin" / "oppu"),
        "eval",
        "movielens",
        *EVAL_ARGS,
        *where,
        "--out",
        str(out),
    ]


def run_evals(eval_dir: Path, data: Path, reuse: bool) -> dict[str, Any]:
    eval_dir.mkdir(parents=True, exist_ok=True)
    commands: dict[str, str] = {}
    for dtype in DTYPES:
        out = eval_dir / f"eval-{dtype}.json"
        cmd = eval_command(dtype, out, data)
        commands[dtype] = f"OPPU_DTYPE={dtype} " + shlex.join(cmd)
        if reuse and out.is_file():
            continue
        print(f"[dtype_quality] {commands[dtype]}", flush=True)
        subprocess.run(cmd, env={**os.environ, "OPPU_DTYPE": dtype}, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    paths = {d: eval_dir / f"eval-{d}.json" for d in DTYPES}
    reports = {d: json.loads(p.read_text()) for d, p in paths.items()}
    written = {d: time.strftime("%Y-%m-%d %H:%M", time.gmtime(p.stat().st_mtime)) for d, p in paths.items()}
    return {"commands": commands, "reports_written_utc": written, "reused": reuse, **eval_summary(reports)}


def errors_by_item(report: Mapping[str, Any], method: str) -> dict[tuple[str, str], float]:
    """|pred - gold| per (user, item); an unparsed answer is read as the user's history mean, as the eval's
    own CIs read it (evaluation/analysis._filled)."""
    out = {}
    for r in report["predictions"]:
        pred = r["pred"][method] if r["pred"][method] is not None else r["pred"]["user_mean"]
        out[str(r["user"]), str(r["item"])] = abs(float(pred) - float(r["gold"]))
    return out


def eval_summary(reports: Mapping[str, Mapping[str, Any]], resamples: int = 2000) -> dict[str, Any]:
    """MAE per LLM method and readout, each dtype's user-level bootstrap CI and the paired bf16 - fp32 CI."""
    fp32, bf16 = reports["float32"], reports["bfloat16"]
    methods = [m for m in fp32["predictions"][0]["pred"] if m in bf16["predictions"][0]["pred"]]
    llm = [m for m in methods if m.removesuffix("_ev").removesuffix("_median") in fp32["config"]["methods"]]
    out: dict[str, Any] = {}
    for method in llm:
        a, b = errors_by_item(fp32, method), errors_by_item(bf16, method)
        if a.keys() != b.keys():
            raise ValueError(f"{method}: the two eval runs scored different items")
        keys = sorted(a)
        users = [u for u, _ in keys]
        ea, eb = [a[k] for k in keys], [b[k] for k in keys]
        zeros = [0.0] * len(keys)
        ci = {
            d: paired_ci(users, e, zeros, n_resamples=resamples, seed=0) for d, e in (("float32", ea), ("bfloat16", eb))
        }
        diff = paired_ci(users, eb, ea, n_resamples=resamples, seed=0)
        out[method] = {
            **{d: {"mae": round(c.mean_diff, 4), "ci95": [round(c.low, 4), round(c.high, 4)]} for d, c in ci.items()},
            "bf16_minus_fp32": {
                "mean": round(diff.mean_diff, 4), "ci95": [round(diff.low, 4), round(diff.high, 4)],
                "ci_includes_0": not diff.excludes_zero,
            },
            "items_with_different_error": sum(x != y for x, y in zip(ea, eb, strict=True)),
            "unparsed": {d: sum(r["pred"][method] is None for r in rep["predictions"]) for d, rep in reports.items()},
        }  # fmt: skip
    return {
        "config": {k: fp32["config"].get(k) for k in ("users", "items", "history_items", "test_items", "split")},
        "dtype_of_runs": {d: r["config"]["dtype"] for d, r in reports.items()},
        "bootstrap": {
            "level": "user",
            "resamples": resamples,
            "alpha": 0.05,
            "n_users": len({r["user"] for r in fp32["predictions"]}),
        },
        "timing_total_s": {d: r["timing"]["total_s"] for d, r in reports.items()},
        "user_train_s": {d: r["timing"].get("user_train_s") for d, r in reports.items()},
        "methods": out,
    }


def verdict(report: Mapping[str, Any]) -> dict[str, Any]:
    """Each threshold of docs/dtype.md against the measured figures (None where a part was not run)."""
    out: dict[str, Any] = {"thresholds": THRESHOLDS, "mae_margin_stars": MAE_MARGIN, "method": HEADLINE}
    checks: dict[str, bool | None] = {"top1": None, "mean_dlogprob": None, "p99_dlogprob": None, "dev_mae": None}
    if "tokens" in report:
        t = report["tokens"]["bf16_vs_fp32"]["all"]
        checks["top1"] = t["top1_agreement"] >= THRESHOLDS["top1_agreement_min"]
        checks["mean_dlogprob"] = t["mean_abs_dlogprob"] <= THRESHOLDS["mean_abs_dlogprob_max"]
        checks["p99_dlogprob"] = t["p99_abs_dlogprob"] <= THRESHOLDS["p99_abs_dlogprob_max"]
    if "eval" in report:
        diff = report["eval"]["methods"][HEADLINE]["bf16_minus_fp32"]
        checks["dev_mae"] = diff["ci95"][1] <= MAE_MARGIN
    out["checks"] = checks
    out["bf16_allowed_as_default"] = all(checks.values()) if None not in checks.values() else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="tokens,eval")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--eval-dir", type=Path, default=Path(tempfile.gettempdir()) / "oppu-dtype-quality")
    parser.add_argument("--reuse-eval", action="store_true", help="read eval reports already in --eval-dir")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    report: dict[str, Any] = {
        "bench": "dtype_quality",
        "model": "SmolLM2-135M-Instruct (the default OPPU_MODEL)",
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine_before": machine_record(dtype="float32,bfloat16"),
    }
    if "tokens" in parts:
        started = time.perf_counter()
        report["tokens"] = tokens_part(args.data)
        report["tokens"]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report["tokens"]["bf16_vs_fp32"]["all"]), flush=True)
    if "eval" in parts:
        report["eval"] = run_evals(args.eval_dir, args.data, args.reuse_eval)
    report["verdict"] = verdict(report)
    report["machine_after"] = machine_record(dtype="float32,bfloat16")
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
