"""Adapter scale: 10,000 distinct user LoRAs on disk, traffic Zipf(1.1)-distributed over 1,000 of the users,
64 adapter slots and a bounded host tier, on the builtin engine and the real default model. Compared with the
all-hot case (the same requests spread over 64 users whose adapters sit in the slots): tokens/s and the ratio,
plus hit rates per tier (slot, host) and load times. Prints one JSON.

Usage: .venv/bin/python bench/scale.py [--adapters 10000] [--users 1000] [--requests 512] [--host-mib 256]
Each adapter: rank 8 on q_proj and v_proj, float16 on disk (~0.9 MiB; 10,000 take ~9 GB in a temp folder).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from service.adapters.cache import AdapterCache
from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, make_peft_config
from service.adapters.slots import LoraSlots
from service.config import Settings
from service.engine.base import collect
from service.engine.builtin.engine import BuiltinEngine
from service.engine.types import AdapterRef, EngineRequest, SamplingParams
from service.inference.loader import LoadedModel, load_model

TARGETS = ("q_proj", "v_proj")
RANK, SLOTS, ROWS, PROMPT, NEW = 8, 64, 16, 32, 16
MAX_SCALE = 256.0


def write_adapters(model: Any, root: Path, n: int) -> list[Path]:
    """n distinct random LoRAs as PEFT pairs (fp16), written directly (PEFT's save would take an hour)."""
    shapes = {
        name: (mod.in_features, mod.out_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }
    config = json.dumps(make_peft_config(RANK, 2 * RANK, TARGETS, None))
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(n):
        tensors = {}
        for name, (d_in, d_out) in shapes.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(RANK, d_in, generator=g) * 0.02).half()
            tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(d_out, RANK, generator=g) * 0.02).half()
        d = root / f"{i:05d}"
        d.mkdir(parents=True)
        save_file(tensors, str(d / WEIGHTS_NAME))
        (d / CONFIG_NAME).write_text(config)
        dirs.append(d)
    return dirs


def zipf_users(n_users: int, n_requests: int, s: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (k**s) for k in range(1, n_users + 1)]
    return rng.choices(range(n_users), weights=weights, k=n_requests)


def run_phase(
    engine: BuiltinEngine, refs: list[AdapterRef], users: list[int], prompts: list[tuple[int, ...]]
) -> dict[str, Any]:
    params = SamplingParams(NEW)  # no stop tokens: exactly NEW tokens per request

    async def main() -> int:
        sem = asyncio.Semaphore(ROWS)  # ROWS clients: one request each at a time

        async def one(i: int, u: int) -> int:
            async with sem:
                req = EngineRequest(f"r{i}", prompts[i], params, refs[u], f"t{u}", time.monotonic() + 3600)
                return len((await collect(engine, req)).tokens)

        return sum(await asyncio.gather(*(one(i, u) for i, u in enumerate(users))))

    started = time.perf_counter()
    tokens = asyncio.run(main())
    wall = time.perf_counter() - started
    return {"requests": len(users), "tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--host-mib", type=int, default=256)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--out")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        report = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    loaded = load_model(Settings(model_cache_dir=Path(".cache/models")))
    started = time.perf_counter()
    dirs = write_adapters(loaded.model, root / "adapters", args.adapters)
    written_s = time.perf_counter() - started
    disk_bytes = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    rng = random.Random(0)
    chosen = rng.sample(range(args.adapters), args.users)  # the users that get traffic, anywhere in the store
    refs = [AdapterRef(f"u{i}", 1, f"{i:064d}", dirs[i]) for i in chosen]
    prompts = [tuple(rng.randrange(200, 40000) for _ in range(PROMPT)) for _ in range(args.requests)]
    zipf = zipf_users(args.users, args.requests, args.zipf, rng)
    events: Counter[str] = Counter()
    load_s: dict[str, list[float]] = {"host": [], "slot": []}

    def on_event(event: str, tier: str, seconds: float) -> None:
        events[f"{tier}_{event}"] += 1
        if event == "load":
            load_s[tier].append(seconds)

    model = copy.deepcopy(loaded.model)
    slots = LoraSlots(model, SLOTS, RANK, TARGETS, device=loaded.device, dtype=loaded.dtype)
    cache = AdapterCache(slots, host_budget_bytes=args.host_mib << 20, max_scale=MAX_SCALE, on_event=on_event)
    engine = BuiltinEngine(
        LoadedModel(model, loaded.tokenizer, loaded.device, loaded.dtype, loaded.name, None),
        cache, slots, max_rows=ROWS, max_model_len=512, max_batch_tokens=512, window_s=0.0,
        queue_max=4096, queue_per_tenant=4096, max_scale=MAX_SCALE,
    )  # fmt: skip
    engine.start()
    try:
        # All hot: the same Zipf ranks folded onto 64 users, every adapter in a slot before timing.
        hot = [u % SLOTS for u in zipf]
        run_phase(engine, refs, list(range(SLOTS)), prompts[:SLOTS])
        all_hot = run_phase(engine, refs, hot, prompts)
        events.clear()
        for tier in load_s.values():
            tier.clear()
        cold_start = run_phase(engine, refs, zipf, prompts)  # slots and host hold the hot set from before
        cold_events = dict(events)
        events.clear()
        steady = run_phase(engine, refs, zipf, prompts)  # the same traffic again: the tiers are warm
        steady_events = dict(events)
    finally:
        engine.stop()
    return {
        "bench": "scale", "model": loaded.name, "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "adapters_on_disk": args.adapters, "disk_bytes": disk_bytes, "written_s": round(written_s, 1),
        "users_with_traffic": args.users, "zipf_s": args.zipf, "requests": args.requests,
        "slots": SLOTS, "host_budget_mib": args.host_mib, "rows": ROWS, "prompt_tokens": PROMPT, "new_tokens": NEW,
        "all_hot": all_hot, "zipf_first_pass": cold_start | {"events": cold_events, "hit_rates": rates(cold_events)},
        "zipf_steady": steady | {"events": steady_events, "hit_rates": rates(steady_events)},
        "ratio_vs_all_hot": {"first_pass": round(cold_start["tok_s"] / all_hot["tok_s"], 3),
                             "steady": round(steady["tok_s"] / all_hot["tok_s"], 3)},
        "load_ms_p50": {t: round(1000 * sorted(v)[len(v) // 2], 2) for t, v in load_s.items() if v},
        "distinct_users_requested": len(set(zipf)),
    }  # fmt: skip


def rates(events: dict[str, int]) -> dict[str, float]:
    out = {}
    for tier in ("slot", "host"):
        hit, miss = events.get(f"{tier}_hit", 0), events.get(f"{tier}_miss", 0)
        if hit + miss:
            out[tier] = round(hit / (hit + miss), 3)
    return out


if __name__ == "__main__":
    main()
