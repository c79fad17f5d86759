"""Where a builtin-engine step spends its time, against what this machine can do (issue 18 item 2).

On the real default model with 16 LoRA slots (r=8, q/k/v/o), it times:
- the matmul peak of the box in the chosen dtype (K=576, N=1536; M=16 and M=512), the yardstick;
- a decode step of `--rows` rows (one token each, every row its own adapter, contexts of ~200 tokens);
- a mixed step (the decode rows plus a 256-token prompt chunk);
- a torch.profiler breakdown of the decode step (top ops by self CPU time).
Model-FLOP utilisation (MFU) = the step's matmul FLOPs (2 x params x tokens, LoRA and attention left out) / time /
the measured peak at the step's token count. `--thread` says where the steps run: `main`, `worker` (a thread of
its own, as the server's engine thread), or `worker-idle-pool` (the same while the main thread keeps an idle
OpenMP pool, as a thread that loaded the model did before service/inference/threads.py). JSON to stdout (and
--out). Usage:
  .venv/bin/python bench/engine_step.py [--dtype bfloat16|float32] [--rows 12] [--thread main] [--packed auto|off]
      [--long-row 1900] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine_record  # noqa: E402
from service.adapters.slots import LoraSlots  # noqa: E402
from service.config import Settings  # noqa: E402
from service.engine.builtin.executor import Chunk, Executor, StepBatch, head_dim  # noqa: E402
from service.engine.builtin.kv import KVLanes  # noqa: E402
from service.engine.builtin.packed import ROWS_HINT, PackedLinears, can_pack  # noqa: E402
from service.inference.loader import load_model  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SLOTS = 16


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `repeat` calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, m: int) -> float:
    x, w = torch.randn(m, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    seconds = timed(lambda: F.linear(x, w), 50)
    return 2 * m * 576 * 1536 / seconds / 1e9


def linear_us(dtype: torch.dtype, out_f: int, rows: int = 16, weights: int = 60) -> dict[str, float]:
    """Microseconds of one (rows x 576) x (576 x out_f) Linear, over `weights` distinct weights (not cache-hot,
    as in a step), from the plain weight and from the weight packed once for oneDNN (packed.py's op)."""
    ws = [torch.randn(out_f, 576, dtype=dtype) for _ in range(weights)]
    x = torch.randn(rows, 576, dtype=dtype)
    out = {"plain": timed(lambda: [F.linear(x, w) for w in ws], 5) / weights * 1e6}
    if can_pack(torch.device("cpu"), dtype):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT) for w in ws]
        op = torch.ops.mkldnn._linear_pointwise
        out["packed"] = timed(lambda: [op(x, p, None, "none", [], "") for p in packed], 5) / weights * 1e6
    return {k: round(v, 1) for k, v in out.items()}


def decode_batch(rows: int, context: int, long_row: int = 0) -> StepBatch:
    positions = [context + i for i in range(rows)]
    if long_row:  # one row of another tenant with a long context beside the others
        positions[-1] = long_row
    return StepBatch(
        [100 + i for i in range(rows)], positions, list(range(rows)), positions, list(range(1, rows + 1)), [],
        list(range(rows)),
    )  # fmt: skip


def mixed_batch(rows: int, context: int, chunk: int, long_row: int = 0) -> StepBatch:
    d = decode_batch(rows, context, long_row)
    lane = rows
    c = Chunk(start=rows, length=chunk, lane=lane, pos=0, slot=SLOTS)
    return StepBatch(
        d.token_ids + [200 + i for i in range(chunk)], d.positions + list(range(chunk)),
        d.lanes + [lane] * chunk, d.stores + list(range(chunk)), d.decode_slots, [c],
        [*d.logit_rows, rows + chunk - 1],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--thread", default="main", choices=["main", "worker", "worker-idle-pool"])
    parser.add_argument("--packed", default="auto", choices=["auto", "off"], help="OPPU_PACKED_WEIGHTS")
    parser.add_argument("--long-row", type=int, default=0, help="the last decode row's context (0: like the rest)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.thread == "main":
        measure(args)
        return
    if args.thread == "worker-idle-pool":
        a = torch.randn(1024, 1024)
        torch.mm(a, a)  # the main thread builds its OpenMP pool and keeps it, idle
    failed: list[BaseException] = []

    def worker() -> None:
        try:
            measure(args)
        except BaseException as exc:  # re-raised on the main thread
            failed.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if failed:
        raise failed[0]


def measure(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    settings = Settings(model_cache_dir=REPO / ".cache" / "models", dtype=args.dtype)
    loaded = load_model(settings)
    model, dtype = loaded.model, loaded.dtype
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if getattr(model.config, "tie_word_embeddings", False):
        params += model.get_input_embeddings().weight.numel()  # the tied vocab projection runs every step
    slots = LoraSlots(model, SLOTS, 8, TARGETS, device=loaded.device, dtype=dtype)
    for layer in slots.layers.values():  # every slot a random r=8 adapter
        for s in range(1, SLOTS + 1):
            a, b = layer.prepare(s, 8)
            a.copy_(torch.randn_like(a) * 0.02)
            b.copy_(torch.randn_like(b) * 0.02)
    cfg = model.config
    kv = KVLanes(
        layers=int(cfg.num_hidden_layers), lanes=SLOTS + 1, kv_heads=int(cfg.num_key_value_heads),
        head_dim=head_dim(cfg), capacity=max(1024, args.long_row + 300), device=loaded.device, dtype=dtype,
    )  # fmt: skip
    ex = Executor(model, kv, slots)
    packed = args.packed == "auto" and can_pack(loaded.device, dtype)
    if packed:  # as BuiltinEngine does: after the slots wrapped their Linears
        PackedLinears(model)
    decode, mixed = decode_batch(args.rows, 200, args.long_row), mixed_batch(args.rows, 200, 256, args.long_row)
    decode_s = timed(lambda: ex.forward(decode), args.repeat)
    mixed_s = timed(lambda: ex.forward(mixed), max(5, args.repeat // 4))
    peak_small, peak_large = matmul_peak(dtype, 16), matmul_peak(dtype, 512)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            ex.forward(decode)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    report: dict[str, Any] = {
        "bench": "engine_step", "model": loaded.name, "params_in_matmuls": params, "rows": args.rows,
        "long_row_context": args.long_row,
        "thread": args.thread, "packed_weights": packed,
        "machine": machine_record(args.dtype), "date": time.strftime("%Y-%m-%d %H:%M"),
        "matmul_peak_gflops": {"m16": round(peak_small, 1), "m512": round(peak_large, 1)},
        "linear_16_rows_us": {"576x1536": linear_us(dtype, 1536), "576x49152": linear_us(dtype, 49152, weights=2)},
        "decode_step_ms": round(decode_s * 1e3, 2),
        "decode_mfu": round(2 * params * args.rows / decode_s / 1e9 / peak_small, 3),
        "mixed_step_ms": round(mixed_s * 1e3, 2),
        "mixed_mfu": round(2 * params * (args.rows + 256) / mixed_s / 1e9 / peak_large, 3),
        "decode_profile_top": [
            {"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count // 5}
            for e in top
        ],
    }  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
