"""Mixed-adapter serving throughput and adapter swap latency on the real default model; prints one JSON.

Throughput (tokens/s, median of repeats) at batch 16 for: the builtin engine on base rows, the builtin engine
with 16 distinct adapters in its LoRA slots, PEFT's mixed batch (adapter_names), and serial per-request PEFT
set_adapter + generate. Swap
latencies: host->slot, disk->slot, and PEFT load_adapter. Usage: .venv/bin/python bench/adapters.py
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.adapters.cache import AdapterCache
from service.adapters.peft_format import AdapterWeights, read_adapter_dir
from service.adapters.slots import LoraSlots
from service.config import Settings
from service.engine.base import collect
from service.engine.builtin.engine import BuiltinEngine
from service.engine.types import AdapterRef, EngineRequest, SamplingParams
from service.inference.loader import LoadedModel, load_model
from service.inference.tokens import encode_prompt

MAX_SCALE = 256.0  # the default OPPU_ADAPTER_MAX_SCALE

USERS, NEW_TOKENS, REPEATS, SWAPS = 16, 32, 3, 40
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
QUESTIONS = [  # short: the chat template adds ~30 tokens, so prompts are ~35-45 tokens
    "Why do cats sleep so much?",
    "Give me a quick lentil soup recipe.",
    "How does a fridge keep food cold?",
    "Explain the chess rules briefly.",
    "Tips for learning Spanish?",
    "What causes the seasons?",
    "How do I plan a family budget?",
    "What is stoicism about?",
    "How do vaccines work?",
    "Packing list for a weekend hike?",
    "Why is the sky blue?",
    "Write a polite deadline extension email.",
    "Weather versus climate: the difference?",
    "How do bees make honey?",
    "Habits for better sleep?",
    "Who invented the bicycle?",
]


def timed(sync: Callable[[], None], fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - start


def median_tokens_per_s(
    variants: dict[str, Callable[[], int]], sync: Callable[[], None]
) -> tuple[dict[str, float], dict[str, float]]:
    """Median tokens per wall second and per process-CPU second of each variant.

    Each variant is warmed once, then all run interleaved REPEATS times so that load drift hits them alike.
    The CPU-time rate is a diagnostic for a shared machine, where other processes distort wall time.
    """
    for fn in variants.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(REPEATS):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = fn()
            sync()
            wall[name].append(tokens / (time.perf_counter() - start))
            cpu[name].append(tokens / (time.process_time() - start_cpu))
            print(f"{name}: {wall[name][-1]:.1f} tokens/s", file=sys.stderr)  # progress; stdout is the JSON
    median = statistics.median
    return {n: median(r) for n, r in wall.items()}, {n: median(r) for n, r in cpu.items()}


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return round(statistics.median(ordered) * 1e3, 3), round(p99 * 1e3, 3)


def left_padded(prompts: list[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def make_adapters(model: Any, root: Path) -> tuple[Any, list[Path]]:
    """A PeftModel holding USERS random adapters (B small but non-zero) and each saved in its own folder."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights=False)
    peft = None
    dirs = []
    for u in range(USERS):
        torch.manual_seed(1000 + u)
        name = f"u{u}"
        if peft is None:
            peft = get_peft_model(model, config, adapter_name=name)
        else:
            peft.add_adapter(name, config)
        with torch.no_grad():
            for pname, p in peft.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.normal_(0.0, 0.02)
        peft.save_pretrained(root, selected_adapters=[name])
        dirs.append(root / name)  # PEFT puts a non-"default" adapter in a sub-folder named after it
    assert peft is not None
    peft.eval()
    return peft, dirs


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        run(Path(tmp))


def run(root: Path) -> None:
    from transformers import GenerationConfig

    loaded = load_model(Settings(model_cache_dir=Path(".cache/models")))
    tok, device, dtype = loaded.tokenizer, loaded.device, loaded.dtype
    pad = int(tok.pad_token_id)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompts = [encode_prompt(tok, q) for q in QUESTIONS]  # chat-formatted, as the server builds them
    greedy = SamplingParams(NEW_TOKENS)  # no stop tokens: every row makes exactly NEW_TOKENS tokens

    base = loaded.model
    slot_model = copy.deepcopy(base)
    peft, dirs = make_adapters(copy.deepcopy(base), root)
    weights: list[AdapterWeights] = [read_adapter_dir(max_scale=MAX_SCALE, directory=d) for d in dirs]
    slots = LoraSlots(slot_model, USERS, 8, TARGETS, device=device, dtype=dtype)  # filled by the engine's cache

    engine = BuiltinEngine(
        LoadedModel(slot_model, tok, device, dtype, loaded.name, None),
        AdapterCache(slots, host_budget_bytes=1 << 30, max_scale=MAX_SCALE),
        slots,
        max_rows=USERS,
        max_model_len=512,
        max_batch_tokens=1024,
        window_s=0.0,
        queue_max=1024,
        queue_per_tenant=1024,
        max_scale=MAX_SCALE,
    )
    engine.start()
    refs = [AdapterRef(f"u{u}", 1, f"{u:064d}", d) for u, d in enumerate(dirs)]

    def engine_rows(adapters: list[AdapterRef | None]) -> list[list[int]]:
        async def all_rows() -> list[list[int]]:
            reqs = [
                EngineRequest(f"r{u}", tuple(p), greedy, a, f"t{u}", time.monotonic() + 600)
                for u, (p, a) in enumerate(zip(prompts, adapters, strict=True))
            ]
            done = await asyncio.gather(*(collect(engine, r) for r in reqs))
            return [d.token_ids for d in done]

        return asyncio.run(all_rows())

    def engine_run(adapters: list[AdapterRef | None]) -> int:
        return sum(map(len, engine_rows(adapters)))

    base_refs: list[AdapterRef | None] = [None] * USERS
    slot_refs: list[AdapterRef | None] = list(refs)

    batch = left_padded(prompts, pad, device)
    # Exactly NEW_TOKENS per row on both sides: no eos stop (min_new_tokens would instead mask eos and
    # change PEFT's tokens), so the outputs can be compared row by row.
    peft.generation_config.eos_token_id = None
    gen_config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    names = [f"u{u}" for u in range(USERS)]

    def peft_mixed() -> int:
        with torch.inference_mode():
            out = peft.generate(**batch, generation_config=gen_config, adapter_names=names)
        return int(out[:, batch["input_ids"].shape[1] :].numel())

    def peft_serial() -> int:
        total = 0
        for name, p in zip(names, prompts, strict=True):
            peft.set_adapter(name)
            with torch.inference_mode():
                out = peft.generate(input_ids=torch.tensor([p], device=device), generation_config=gen_config)
            total += out.shape[1] - len(p)
        return total

    tps, cpu_tps = median_tokens_per_s(
        {
            "base": lambda: engine_run(base_refs),
            "slots": lambda: engine_run(slot_refs),
            "peft_mixed": peft_mixed,
            "peft_serial": peft_serial,
        },
        sync,
    )

    # Correctness signal: do the slot rows reproduce PEFT's own mixed batch, and do adapters change outputs?
    slot_out = engine_rows(slot_refs)
    base_out = engine_rows(base_refs)
    with torch.inference_mode():
        peft_out = peft.generate(**batch, generation_config=gen_config, adapter_names=names)
    peft_rows = peft_out[:, batch["input_ids"].shape[1] :].tolist()

    def disk_to_slot(slot: int, folder: Path) -> None:
        slots.load(slot, read_adapter_dir(max_scale=MAX_SCALE, directory=folder))

    engine.stop()  # the swap timings below write slots directly
    host: list[float] = []
    disk: list[float] = []
    peft_load: list[float] = []
    for i in range(SWAPS):
        slot, u = 1 + i % USERS, (i * 7 + 3) % USERS  # a different adapter lands in each slot
        host.append(timed(sync, slots.load, slot, weights[u]))
        disk.append(timed(sync, disk_to_slot, slot, dirs[u]))
        peft_load.append(timed(sync, peft.load_adapter, dirs[u], "swap"))
        peft.delete_adapter("swap")

    host_p50, host_p99 = percentiles_ms(host)
    disk_p50, disk_p99 = percentiles_ms(disk)
    peft_p50, peft_p99 = percentiles_ms(peft_load)
    result = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "batch": USERS,
        "new_tokens": NEW_TOKENS,
        "prompt_tokens_min_max": [min(map(len, prompts)), max(map(len, prompts))],
        "repeats": REPEATS,
        "swaps": SWAPS,
        **{f"{k}_tokens_per_s": round(v, 2) for k, v in tps.items()},
        "slot_vs_base_tokens_ratio": round(tps["slots"] / tps["base"], 3),
        "slot_vs_serial_tokens_ratio": round(tps["slots"] / tps["peft_serial"], 3),
        "slot_vs_peft_mixed_tokens_ratio": round(tps["slots"] / tps["peft_mixed"], 3),
        "peft_mixed_vs_base_tokens_ratio": round(tps["peft_mixed"] / tps["base"], 3),
        **{f"{k}_tokens_per_cpu_s": round(v, 2) for k, v in cpu_tps.items()},
        "slot_vs_base_cpu_ratio": round(cpu_tps["slots"] / cpu_tps["base"], 3),
        "slot_vs_serial_cpu_ratio": round(cpu_tps["slots"] / cpu_tps["peft_serial"], 3),
        "host_to_slot_ms_p50": host_p50,
        "host_to_slot_ms_p99": host_p99,
        "disk_to_slot_ms_p50": disk_p50,
        "disk_to_slot_ms_p99": disk_p99,
        "peft_load_adapter_ms_p50": peft_p50,
        "peft_load_adapter_ms_p99": peft_p99,
        "slot_rows_equal_peft_mixed": sum(a == b for a, b in zip(slot_out, peft_rows, strict=True)),
        "slot_rows_changed_vs_base": sum(a != b for a, b in zip(slot_out, base_out, strict=True)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
