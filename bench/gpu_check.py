"""GPU check (run by bench/gpu_check.sh on a lent GPU machine; also runs on CPU to test the script itself).

Sections, each timed and reported in one JSON; a section that cannot run (a package missing on the machine)
is reported with its error, never silently dropped:
1. slot_vs_peft: our LoRA slot path (mixed rows: two adapters + a base row in one batch) against PEFT's logits
   on the device, fp32 and bf16.
2. builtin_engine: the builtin engine's tokens/s on the two engine workloads (16 users with their own r=8
   q/k/v/o LoRAs, 16 concurrent rows; "mixed": 256-token prompts, 8-128 new tokens; "fixed": 128 / 64).
3. vllm_engine: our vLLM engine on the same requests (needs the `vllm` package there).
4. fused_kernel: the fused attention kernel (SDPA flash / efficient backends) against the math reference.

The model is SmolLM2-135M-shaped with random weights (the GGUF does not travel); throughput does not depend
on the weights, and outputs are compared engine vs reference on the same weights. Tokenizer: the default
model's, prepared here by `--prepare DIR` (a few MB) and carried.

Usage: python bench/gpu_check.py --tokenizer DIR [--device cuda] [--quick] [--out FILE]
       python bench/gpu_check.py --prepare DIR   (on the dev box: write the tokenizer folder)
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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
USERS, ROWS, RANK = 16, 16, 8
WORKLOADS = {"mixed": (256, (8, 128)), "fixed": (128, (64, 64))}


def smollm_shaped(quick: bool) -> Any:
    from transformers import LlamaConfig

    layers = 4 if quick else 30
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip


def save_model(config: Any, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def make_adapters(base: Any, root: Path, n: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    dirs = []
    for k in range(n):
        torch.manual_seed(1000 + k)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(QKVO), init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        dirs.append(root / f"user{k}")
        model.save_pretrained(dirs[-1])
        base = model.unload()
    return dirs


# --- sections ---
def slot_vs_peft(model_dir: Path, adapters: list[Path], device: str) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from service.adapters.peft_format import read_adapter_dir
    from service.adapters.slots import LoraSlots

    out: dict[str, Any] = {}
    ids = torch.tensor([[random.Random(k).randrange(200, 40000) for _ in range(64)] for k in range(3)])
    for dtype in (torch.float32, torch.bfloat16):
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        model = copy.deepcopy(base)
        slots = LoraSlots(model, 2, RANK, QKVO, device=torch.device(device), dtype=dtype)
        slots.load(1, read_adapter_dir(adapters[0], max_scale=256.0))
        slots.load(2, read_adapter_dir(adapters[1], max_scale=256.0))
        with torch.inference_mode(), slots.batch([1, 0, 2], tokens_per_row=ids.shape[1]):
            got = model(input_ids=ids.to(device)).logits.float()
        refs = []
        with torch.inference_mode():
            for row, which in enumerate((adapters[0], None, adapters[1])):
                ref_model = PeftModel.from_pretrained(copy.deepcopy(base), which) if which else base
                refs.append(ref_model(input_ids=ids[row : row + 1].to(device)).logits[0].float())
        diffs = [float((got[i] - refs[i]).abs().max()) for i in range(3)]
        agree = [float((got[i].argmax(-1) == refs[i].argmax(-1)).float().mean()) for i in range(3)]
        with torch.inference_mode():  # the adapters must matter, or agreement would say nothing
            bare = base(input_ids=ids[:1].to(device)).logits[0].float()
        effect = float((refs[0] - bare).abs().max())
        out[str(dtype).removeprefix("torch.")] = {
            "max_abs_diff_per_row": diffs, "argmax_agreement": agree, "adapter_effect_max_abs": effect,
        }  # fmt: skip
    fp32 = out["float32"]
    out["pass"] = max(fp32["max_abs_diff_per_row"]) < 1e-3 < fp32["adapter_effect_max_abs"]
    return out


def requests(workload: str) -> list[tuple[int, tuple[int, ...], int]]:
    prompt_len, (lo, hi) = WORKLOADS[workload]
    rng = random.Random(workload)
    return [
        (i % USERS, tuple(rng.randrange(200, 40000) for _ in range(prompt_len)), rng.randint(lo, hi))
        for i in range(2 * ROWS)
    ]


def drive(engine: Any, refs: list[Any], workload: str) -> dict[str, Any]:
    from service.engine.base import collect
    from service.engine.types import EngineRequest, SamplingParams

    reqs = requests(workload)

    async def main() -> list[tuple[int, float]]:
        sem = asyncio.Semaphore(ROWS)

        async def one(i: int, user: int, prompt: tuple[int, ...], new: int) -> tuple[int, float]:
            async with sem:
                started = time.perf_counter()
                req = EngineRequest(f"{workload}-{i}", prompt, SamplingParams(new), refs[user], f"t{user}",
                                    time.monotonic() + 600)  # fmt: skip
                await asyncio.to_thread(engine.prefetch, refs[user])
                tokens = len((await collect(engine, req)).tokens)
                return tokens, time.perf_counter() - started

        return await asyncio.gather(*(one(i, *r) for i, r in enumerate(reqs)))

    asyncio.run(main())  # warm-up: every adapter loaded, kernels compiled
    started = time.perf_counter()
    done = asyncio.run(main())
    wall = time.perf_counter() - started
    tokens = sum(t for t, _ in done)
    lat = sorted(s for _, s in done)
    return {"requests": len(done), "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "latency_p50_s": round(lat[len(lat) // 2], 3)}  # fmt: skip


def builtin_engine(model_dir: Path, adapters: list[Path], device: str) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from service.adapters.cache import AdapterCache
    from service.adapters.slots import LoraSlots
    from service.engine.builtin.engine import BuiltinEngine
    from service.engine.types import AdapterRef
    from service.inference.loader import LoadedModel

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    slots = LoraSlots(model, USERS, RANK, QKVO, device=torch.device(device), dtype=dtype)
    cache = AdapterCache(slots, host_budget_bytes=256 << 20, max_scale=256.0)
    loaded = LoadedModel(model, None, torch.device(device), dtype, "smollm2-shaped", None)
    engine = BuiltinEngine(loaded, cache, slots, max_rows=ROWS, max_model_len=1024, max_batch_tokens=2048,
                           window_s=0.0, queue_max=1024, queue_per_tenant=1024, max_scale=256.0)  # fmt: skip
    refs = [AdapterRef(f"u{k}", 1, f"{k:064x}", d) for k, d in enumerate(adapters)]
    engine.start()
    try:
        return {"dtype": str(dtype).removeprefix("torch."), **{w: drive(engine, refs, w) for w in WORKLOADS}}
    finally:
        engine.stop()


def vllm_engine(model_dir: Path, adapters: list[Path], device: str, work: Path) -> dict[str, Any]:
    from service.engine.types import AdapterRef
    from service.engine.vllm.engine import VllmConfig, VllmEngine
    from service.engine.vllm.runtime import load

    dtype = "float32" if device == "cpu" else "bfloat16"
    load(2.0)
    config = VllmConfig(
        model_dir=model_dir, model_name="smollm2-shaped", dtype=dtype, max_model_len=1024, max_rows=ROWS,
        max_batch_tokens=2048, adapter_slots=USERS, max_cpu_loras=2 * USERS, max_lora_rank=RANK, max_scale=256.0,
        kv_cache_gib=2.0, gpu_memory_utilization=0.5, prefix_caching=False, queue_max=1024, queue_per_tenant=1024,
        work_dir=work, target_modules=QKVO, seed=0,
    )  # fmt: skip
    engine = VllmEngine(config)
    refs = [AdapterRef(f"u{k}", 1, f"{k:064x}", d) for k, d in enumerate(adapters)]
    engine.start()
    try:
        return {"dtype": dtype, **{w: drive(engine, refs, w) for w in WORKLOADS}}
    finally:
        engine.stop()


def fused_kernel(device: str) -> dict[str, Any]:
    """SDPA's fused backends (flash, memory-efficient) against the math backend, bf16, causal, GQA shapes of
    the model (9 query heads, 64 head dim)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(4, 9, 512, 64, generator=g).to(device, torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        ref = sdpa(q.float(), k.float(), v.float(), is_causal=True)
    out: dict[str, Any] = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                got = sdpa(q, k, v, is_causal=True)
            out[name] = {"max_abs_diff": float((got.float() - ref).abs().max())}
        except RuntimeError as exc:  # a backend this device does not have
            out[name] = {"unavailable": str(exc).splitlines()[0][:200]}
    diffs = [r["max_abs_diff"] for r in out.values() if "max_abs_diff" in r]
    out["pass"] = bool(diffs) and max(diffs) < 2e-2
    return out


def section(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    started = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # reported, never hidden: the JSON says which part could not run and why
        report[name] = {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-1500:]}
    report[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(f"[gpu_check] {name}: {json.dumps(report[name])[:400]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, help="write the default model's tokenizer here and exit")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 30 (to test the script)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.prepare:
        from transformers import AutoTokenizer

        from service.inference.loader import default_gguf_path

        gguf = default_gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(args.prepare)
        return
    if args.tokenizer is None:
        parser.error("--tokenizer DIR is needed (make it with --prepare DIR)")
    report: dict[str, Any] = {
        "bench": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__, "cpus": os.cpu_count(), "quick": args.quick,
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        config = smollm_shaped(args.quick)
        model_dir = save_model(config, args.tokenizer, work / "model")
        from transformers import LlamaForCausalLM

        adapters = make_adapters(LlamaForCausalLM.from_pretrained(model_dir), work / "adapters", USERS)
        skip = set(args.skip.split(","))
        sections: dict[str, Callable[[], dict[str, Any]]] = {
            "slot_vs_peft": lambda: slot_vs_peft(model_dir, adapters, args.device),
            "fused_kernel": lambda: fused_kernel(args.device),
            "builtin_engine": lambda: builtin_engine(model_dir, adapters, args.device),
            "vllm_engine": lambda: vllm_engine(model_dir, adapters, args.device, work / "vllm"),
        }
        for name, fn in sections.items():
            if name not in skip:
                section(report, name, fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
