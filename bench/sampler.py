"""Time the builtin engine's choose() for 8 rows of 49,152-vocab logits under several option mixes, on one
thread (the engine thread's share). `--old PATH` also times another sampler.py (e.g. `git show
HEAD~1:service/engine/builtin/sampler.py > /tmp/old_sampler.py`), alternating with this one in one process.

    python -m bench.sampler [--old /tmp/old_sampler.py] [--repeats 5] [--steps 20] [--out results/sampler.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from types import ModuleType
from typing import Any

import torch

from bench.machine import machine_record
from service.engine.builtin import sampler
from service.engine.types import SamplingParams

ROWS, VOCAB = 8, 49_152
BIAS = {t: (-1.0) ** t * 5.0 for t in range(0, 3_000, 10)}  # 300 entries
MIXES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "temperature 1": {"temperature": 1.0},
    "top_p 0.9": {"temperature": 1.0, "top_p": 0.9},
    "300 logit_bias": {"logit_bias": BIAS},
    "logprobs 20": {"logprobs": 20},
    "all (t1, top_p .5, bias, lp 20, presence)": {
        "temperature": 1.0,
        "top_p": 0.5,
        "logit_bias": BIAS,
        "logprobs": 20,
        "presence_penalty": 0.5,
    },
}


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_sampler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def per_step_ms(module: ModuleType, options: dict[str, Any], logits: torch.Tensor, steps: int) -> float:
    decoders = [
        module.RowDecoder.for_params(SamplingParams(64, seed=i, **options), torch.device("cpu")) for i in range(ROWS)
    ]
    for dec in decoders:  # 32 emitted tokens, so penalties have something to apply
        for token in range(100, 132):
            dec.observe(token)
    module.choose(decoders, logits)
    start = time.perf_counter()
    for _ in range(steps):
        module.choose(decoders, logits)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="write the medians as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modules = {"new": sampler} | ({"old": load(args.old)} if args.old else {})
    gen = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    # scale 4: a model-like peak (top_p 0.9 keeps ~120 tokens); scale 2: flat (~11k, past top_p's topk).
    for scale in (4.0, 2.0):
        logits = torch.randn(ROWS, VOCAB, generator=gen) * scale
        for mix, options in MIXES.items():
            times: dict[str, list[float]] = {name: [] for name in modules}
            for _ in range(args.repeats):
                for name, module in modules.items():
                    times[name].append(per_step_ms(module, options, logits, args.steps))
            cells = "  ".join(f"{name} {statistics.median(t):7.2f} ms" for name, t in times.items())
            print(f"scale {scale:.0f}  {mix:42s} {cells}", flush=True)
            medians = {f"{name}_ms_per_step": round(statistics.median(t), 3) for name, t in times.items()}
            results.append({"logit_scale": scale, "mix": mix, **medians})
    if args.out:
        record = {
            "bench": "sampler choose(), 8 rows x 49,152 vocab, 1 thread, median of repeats",
            "machine": machine_record("float32"),
            "old": args.old,
            "repeats": args.repeats,
            "steps": args.steps,
            "results": results,
        }
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=2)


if __name__ == "__main__":
    main()
