"""Bench: seconds to train one user's LoRA on MovieLens histories (24 and 100 rating items), the old trainer
against the new one in the SAME run, in bf16 (where the CPU has native bf16) and fp32; real default model.

The training is the server's user stage (LoraTrainConfig.from_settings: OPPU_TRAIN_* defaults, k=1
retrieval over earlier items only, as `oppu eval` and a retrain build it). Users and items are the activity
preset's (service/evaluation/movielens.py: 20 users with >= 216 ratings, seed 0, dev split: each user's last
8 ratings dropped unread, the 8 before them scored); the first --users of them are trained.

- old: every prompt token of every row computed, PEFT's own LoRA dropout (share_prefix/fast_dropout off);
  in the bf16 rows the old trainer runs on fp32 weights under bf16 autocast (the previous default here:
  OPPU_DTYPE=auto meant fp32 weights on every CPU), the new one on bf16 weights (what auto now serves).
- new: the defaults: the common prompt start once per step, cheap shared dropout masks, the fused LoRA
  forward, base weights shared with the caller's model, fused AdamW.
- before (with --baseline-trainer FILE, e.g. `git show REV:service/training/trainer.py > FILE`): that
  trainer module's own defaults, run in the same process on the same models: a before/after in one run.
- variant (with --variant FIELD=VALUE,...): the new trainer with those LoraTrainConfig fields replaced (e.g.
  dropout=0), paired with new by user on the dev MAE.
Each training row records its CPU and system seconds and the pages it faulted in.

Dev quality (cheap proxy of `oppu eval`'s oppu_ev readout): with the user's adapter merged into the base
(no shared LoRA, so absolute values are not the eval's), each dev item's prompt (its title | genres, k=1
retrieval over the history) scores the ratings 0.5..5.0; the expected rating's MAE against the true one.

Prints ONE JSON object (and writes it with --out). The box may be shared: see machine.load_avg/uptime. On a box
whose speed drifts, --rounds N trains every user with every trainer N times, alternating the trainers' order
(seconds_median beside the mean; the dev MAE is the first round's).
An AVX2-only box can be emulated on a newer one for the fp32 rows:
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m bench.training --dtypes fp32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/training.py` from anywhere: bench.* and service.* importable

from bench.machine import machine_record  # noqa: E402
from service.adapters.peft_format import merge_lora, read_adapter_files, unmerge  # noqa: E402
from service.config import Settings  # noqa: E402
from service.evaluation import movielens as ml  # noqa: E402
from service.inference.cpu import cpu_info  # noqa: E402
from service.inference.loader import LoadedModel, load_model  # noqa: E402
from service.inference.tokens import encode_prompt  # noqa: E402
from service.prompts import build_prompt  # noqa: E402
from service.retrieval.bm25 import BM25Index, doc_terms  # noqa: E402
from service.training.examples import build_user_examples  # noqa: E402
from service.training.trainer import LoraTrainConfig, train_lora  # noqa: E402

DATA = Path("/work/shared/data/movielens-latest-small")
RATINGS = [0.5 * i for i in range(1, 11)]
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Item:
    id: str
    input: str | None
    output: str
    kind: str | None = "rating"


def history(split: ml.UserSplit) -> list[Item]:
    return [Item(h.item_id, ml.item_input(h), ml.format_rating(h.rating)) for h in split.history]


def users(n: int, items: int, data: Path) -> list[ml.UserSplit]:
    """The activity preset's users (same users at every history length), dev split."""
    task = ml.build_rating_task(
        ml.load_movielens(data), n_users=20, history_items=items, test_items=8, min_ratings=216, seed=0, holdout=8
    )
    return task.users[:n]


@torch.no_grad()
def dev_mae(lm: LoadedModel, files: dict[str, bytes] | None, split: ml.UserSplit, items: list[Item]) -> float:
    """MAE of the expected rating over the user's dev items, with the adapter (files) merged or the base."""
    originals = merge_lora(lm.model, read_adapter_files(files, max_scale=256.0)) if files else {}
    try:
        index = BM25Index.from_terms(doc_terms(items))
        errors = []
        for item in split.test:
            request = ml.item_input(item)
            retrieved = [items[h.index] for h in index.top_k(request, 1)]
            prompt = encode_prompt(lm.tokenizer, build_prompt(request, retrieved))
            answers = [lm.tokenizer(ml.format_rating(r), add_special_tokens=False)["input_ids"] for r in RATINGS]
            width = len(prompt) + max(len(a) for a in answers)
            ids = torch.full((len(answers), width), lm.tokenizer.pad_token_id, dtype=torch.long)
            for row, answer in enumerate(answers):
                ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            logprobs = torch.log_softmax(lm.model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            scores = torch.stack(
                [
                    sum(logprobs[row, len(prompt) + j - 1, t] for j, t in enumerate(answer))  # type: ignore[misc]
                    for row, answer in enumerate(answers)
                ]
            )
            expected = float((torch.softmax(scores, 0) * torch.tensor(RATINGS)).sum())
            errors.append(abs(expected - item.rating))
        return statistics.fmean(errors)
    finally:
        unmerge(lm.model, originals)


def train_one(
    lm: LoadedModel, split: ml.UserSplit, config: Any, quality: bool, train: Any = train_lora
) -> dict[str, Any]:
    items = history(split)
    examples = build_user_examples(items, k=1)
    cpu_started, usage = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    out = train(lm.model, lm.tokenizer, examples, config, base_model_name=lm.name)
    used = resource.getrusage(resource.RUSAGE_SELF)
    row: dict[str, Any] = {
        "user": split.user_id,
        "seconds": round(out.seconds, 2),
        # CPU time of this process: ~threads x seconds on an idle box; far below that = shared cores.
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        # The kernel's part of it, and the pages faulted in (a step's ~1 GB of activations, when the heap had
        # returned them to the system: glibc does at times).
        "system_seconds": round(used.ru_stime - usage.ru_stime, 2),
        "page_faults": used.ru_minflt - usage.ru_minflt,
        "steps": out.steps,
        "tokens": out.tokens,
        "final_loss": round(out.final_loss, 4),
        "compute_dtype": out.compute_dtype,
    }
    if quality:
        row["dev_mae"] = round(dev_mae(lm, out.files, split, items), 4)
    return row


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::baddbmm")


def profile_one(lm: LoadedModel, split: ml.UserSplit, config: Any, train: Any) -> dict[str, Any]:
    """One more training under torch.profiler: how much of it is matmul (self time of the ops above) and the
    top ops. The matmul time alone bounds how fast this trainer can get on this box at these FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    examples = build_user_examples(history(split), k=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(lm.model, lm.tokenizer, examples, config, base_model_name=lm.name)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "user": split.user_id,
        "profiled_seconds": round(total / 1e6, 2),
        "matmul_seconds": round(matmul / 1e6, 2),
        "matmul_share": round(matmul / total, 3),
        "top_ops": [{"op": e.key, "seconds": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count} for e in top],
    }


def load_trainer(path: Path) -> Any:
    """Another trainer module (an earlier revision's service/training/trainer.py) under its own name."""
    spec = importlib.util.spec_from_file_location("baseline_trainer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


Trainer = tuple[LoadedModel, Any, Any]  # (model, config, train function)


def trainers(
    dtype: str,
    models: dict[str, LoadedModel],
    baseline: Any = None,
    top_layers: int = 0,
    variant: dict[str, Any] | None = None,
) -> dict[str, Trainer]:
    """(model, config, train function) of the old, the baseline (if given), the new trainer, (top_layers > 0)
    the new one with LoRA in the last `top_layers` decoder layers only and (variant) the new one with these
    config fields replaced, for one dtype."""
    new = LoraTrainConfig.from_settings(Settings(dtype=dtype), stage="user")
    old = replace(new, share_prefix=False, fast_dropout=False, fast_lora=False)
    served = models["bfloat16"] if dtype == "bfloat16" else models["float32"]
    out: dict[str, Trainer] = {}
    if dtype == "bfloat16":  # the old default here: fp32 weights, bf16 autocast
        out["old"] = (models["float32"], replace(old, mixed_precision="bf16"), train_lora)
    else:
        out["old"] = (models["float32"], old, train_lora)
    if baseline is not None:
        out["before"] = (
            served,
            baseline.LoraTrainConfig.from_settings(Settings(dtype=dtype), stage="user"),
            baseline.train_lora,
        )
    out["new"] = (served, new, train_lora)
    if top_layers:
        out["top"] = (served, replace(new, top_layers=top_layers), train_lora)
    if variant:
        out["variant"] = (served, replace(new, **variant), train_lora)
    return out


def parse_variant(text: str | None) -> dict[str, Any]:
    """`dropout=0,lr=0.004` -> the LoraTrainConfig fields to replace, each parsed as its default's type."""
    if not text:
        return {}
    defaults = LoraTrainConfig()
    out: dict[str, Any] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        current = getattr(defaults, name.strip(), None)
        if current is None or not isinstance(current, bool | int | float | str):
            raise SystemExit(f"--variant: {name} is not a number, flag or word")
        out[name.strip()] = value == "true" if isinstance(current, bool) else type(current)(value)
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "seconds_per_user": round(statistics.fmean(r["seconds"] for r in rows), 2),
        "seconds_median": round(statistics.median(r["seconds"] for r in rows), 2),
        "trainings": len(rows),
        "cpu_seconds_per_user": round(statistics.fmean(r["cpu_seconds"] for r in rows), 1),
        "steps": rows[0]["steps"],
        "final_loss": round(statistics.fmean(r["final_loss"] for r in rows), 4),
        "compute_dtype": rows[0]["compute_dtype"],
    }
    if scored := [r["dev_mae"] for r in rows if "dev_mae" in r]:  # the first round's
        out["dev_mae"] = round(statistics.fmean(scored), 4)
    return out | {"users": rows}


def paired(rows: list[dict[str, Any]], against: list[dict[str, Any]], draws: int = 10_000) -> dict[str, Any]:
    """Dev MAE of `rows` minus `against`'s, user by user (first round), with a 95% bootstrap interval that
    resamples users (each user's 8 dev items stay together)."""
    import random

    mine = {r["user"]: r["dev_mae"] for r in rows if r["round"] == 0 and "dev_mae" in r}
    theirs = {r["user"]: r["dev_mae"] for r in against if r["round"] == 0 and "dev_mae" in r}
    diffs = [mine[u] - theirs[u] for u in mine if u in theirs]
    if not diffs:
        return {}
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return {
        "users": len(diffs),
        "mean_diff": round(statistics.fmean(diffs), 4),
        "user_ci95": [round(means[int(0.025 * draws)], 4), round(means[int(0.975 * draws) - 1], 4)],
        "worse_for_users": sum(d > 0 for d in diffs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--items", default="24,100", help="history lengths, comma separated")
    parser.add_argument("--dtypes", default="auto", help="bf16,fp32 (auto: bf16 only where native, and fp32)")
    parser.add_argument(
        "--trainers",
        default="old,new",
        help="old, before (needs --baseline-trainer), new, top (needs --top-layers), variant (needs --variant)",
    )
    parser.add_argument(
        "--variant", default=None, help="the 'variant' rows: the new trainer with these fields, e.g. dropout=0"
    )
    parser.add_argument(
        "--top-layers", type=int, default=0, help="the 'top' rows: the new trainer with LoRA in the last N layers only"
    )
    parser.add_argument("--baseline-trainer", type=Path, default=None, help="an earlier trainer.py: the 'before' rows")
    parser.add_argument("--no-quality", action="store_true", help="skip the dev MAE")
    parser.add_argument("--warmup", action="store_true", help="one untimed training per row before the timed ones")
    parser.add_argument("--profile", action="store_true", help="one more training of the first user, profiled")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="train every user with every trainer this many times, odd rounds in reverse",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--earlier", type=Path, default=None, help="an earlier JSON of this bench, kept as earlier_run")
    args = parser.parse_args()
    variant = parse_variant(args.variant)  # before the models load: a wrong field fails at once
    names = {"bf16": "bfloat16", "fp32": "float32"}
    wanted = ["bf16", "fp32"] if args.dtypes == "auto" and cpu_info().native_bf16 else ["fp32"]
    dtypes = [names[d] for d in (args.dtypes.split(",") if args.dtypes != "auto" else wanted)]
    cache = REPO / ".cache" / "models"
    models = {
        d: load_model(Settings(model_cache_dir=cache, device="cpu", dtype=d, torch_threads=args.threads))
        for d in {"float32", *dtypes}
    }
    report: dict[str, Any] = {
        "bench": "training.per_user_lora.movielens",
        "model": models["float32"].name,
        "machine_before": machine_record(dtype=",".join(dtypes)),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "warmup": args.warmup,
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
        "data": {"users": args.users, "split": "dev (activity preset: 20 users, min 216 ratings, seed 0)", "k": 1},
        "results": {},
    }
    baseline = load_trainer(args.baseline_trainer) if args.baseline_trainer else None
    if baseline is not None:
        report["baseline_trainer"] = str(args.baseline_trainer)
    if args.earlier and args.earlier.is_file():  # the figures this run replaces, kept beside it, labelled
        report["earlier_run"] = json.loads(args.earlier.read_text())
    base_mae: dict[str, float] = {}
    for items in (int(x) for x in args.items.split(",")):
        splits = users(args.users, items, args.data)
        for dtype in dtypes:
            if not args.no_quality:
                mae = [dev_mae(models[dtype], None, s, history(s)) for s in splits]
                base_mae[f"{items}_{dtype}"] = round(statistics.fmean(mae), 4)
            options = trainers(dtype, models, baseline, args.top_layers, variant)
            if args.warmup:  # one untimed run: the trainers below all find a warm process (kernels, allocator)
                lm, config, train = options["new"]
                examples = build_user_examples(history(splits[0]), k=1)
                train(lm.model, lm.tokenizer, examples, config, base_model_name=lm.name)
            chosen = [name for name in options if name in args.trainers.split(",")]
            trained: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
            for round_ in range(args.rounds):  # odd rounds in reverse order: a box's drift hits every trainer
                for name in chosen if round_ % 2 == 0 else chosen[::-1]:
                    lm, config, train = options[name]
                    quality = not args.no_quality and round_ == 0
                    trained[name] += [train_one(lm, s, config, quality, train) | {"round": round_} for s in splits]
            for name in chosen:
                lm, config, train = options[name]
                report["results"][f"{items}_items/{dtype}/{name}"] = summary(trained[name])
                print(json.dumps({k: v for k, v in summary(trained[name]).items() if k != "users"}), flush=True)
                if not args.no_quality and name != "new" and "new" in trained:
                    report["results"][f"{items}_items/{dtype}/{name}"]["dev_mae_vs_new"] = paired(
                        trained[name], trained["new"]
                    )
                if args.profile and name == "new":
                    report["results"][f"{items}_items/{dtype}/{name}"]["profile"] = profile_one(
                        lm, splits[0], config, train
                    )
    if base_mae:
        report["dev_mae_base_model_no_adapter"] = base_mae
    if args.top_layers:
        report["top_layers"] = args.top_layers
    if variant:
        report["variant"] = variant
    report["machine_after"] = machine_record(dtype=",".join(dtypes))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
