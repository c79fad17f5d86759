"""Bench: seconds to train one per-user LoRA (user-default config, k=1 retrieval) on 100 history items.

Real default model (SmolLM2-135M-Instruct, fp32 weights), CPU. Prints ONE JSON object; the baseline
(same run, same examples) is the same training with autocast off, i.e. every op in fp32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from service.config import Settings
from service.inference.loader import load_model
from service.training.examples import TrainExample, build_user_examples
from service.training.trainer import LoraTrainConfig, train_lora

TARGET_S = 60.0
PRODUCTS = [
    "espresso machine",
    "hiking boots",
    "noise-cancelling headphones",
    "cast iron skillet",
    "mechanical keyboard",
    "yoga mat",
    "e-reader",
    "air fryer",
    "backpack",
    "desk lamp",
]
OPENERS = [
    "Honestly,",
    "After two weeks of daily use,",
    "I was sceptical at first, but",
    "For the price,",
    "Compared to my old one,",
    "My partner bought this and",
]
PRAISE = [
    "it feels solid and well made",
    "setup took less than five minutes",
    "the battery lasts for days",
    "it is quieter than I expected",
    "cleaning it is painless",
    "the design looks great on my desk",
]
GRIPES = [
    "the manual is confusing",
    "the cable is a bit short",
    "it scratches easily",
    "the app keeps asking me to log in",
    "shipping took far too long",
    "the buttons feel cheap",
]
CLOSERS = [
    "Would buy again.",
    "Four stars from me.",
    "Recommended for beginners.",
    "Not perfect, but good value.",
    "I returned my second one.",
    "Solid choice overall.",
]


@dataclass(frozen=True)
class Item:
    id: str
    input: str | None
    output: str
    kind: str | None = "review"


def synth_history(n: int, seed: int = 0) -> list[Item]:
    """Deterministic review-like items of about 60 tokens each (request + review)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        product = rng.choice(PRODUCTS)
        request = f"Write a {rng.randint(1, 5)}-star review of the {product} you bought last month."
        review = (
            f"{rng.choice(OPENERS)} this {product} surprised me: {rng.choice(PRAISE)}, and "
            f"{rng.choice(PRAISE)}. On the downside, {rng.choice(GRIPES)}. {rng.choice(CLOSERS)}"
        )
        items.append(Item(f"item-{i}", request, review))
    return items


def run(lm: Any, examples: list[TrainExample], config: LoraTrainConfig) -> dict[str, Any]:
    stamps = [time.perf_counter()]
    cpu_started = time.process_time()
    out = train_lora(
        lm.model, lm.tokenizer, examples, config, base_model_name=lm.name,
        progress=lambda _: stamps.append(time.perf_counter()),
    )  # fmt: skip
    cpu_s = time.process_time() - cpu_started
    steps_s = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "seconds": round(out.seconds, 2),
        # CPU time of this process: ~threads x seconds on an idle box; wall far above that = shared cores.
        "cpu_seconds": round(cpu_s, 1),
        "tokens_per_s": round(out.tokens / out.seconds, 1),
        "steps": out.steps,
        "tokens": out.tokens,
        "padding_fraction": round(1 - out.tokens / out.padded_tokens, 3),
        "final_loss": round(out.final_loss, 4),
        "epoch_losses": [round(x, 4) for x in out.epoch_losses],
        "compute_dtype": out.compute_dtype,
        # Per step (the first includes copying the model and wrapping it): spread = contention.
        "step_seconds": [round(x, 1) for x in steps_s],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--no-baseline", action="store_true", help="skip the all-fp32 baseline run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    settings = Settings(
        model_cache_dir=Path(".cache/models"), device="cpu", dtype="float32", torch_threads=args.threads
    )
    lm = load_model(settings)
    config = LoraTrainConfig.user_default()
    started = time.perf_counter()
    examples = build_user_examples(synth_history(args.items), k=1)
    examples_s = time.perf_counter() - started
    load_before = os.getloadavg()[0]
    result = run(lm, examples, config)
    report: dict[str, Any] = {
        "bench": "training.per_user_lora",
        "model": lm.name,
        "device": str(lm.device),
        "weights_dtype": str(lm.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "items": args.items,
        "k": 1,
        "config": {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "rank": config.rank,
            "target_modules": list(config.target_modules),
        },
        "examples_s": round(examples_s, 3),
        **result,
        "target_s": TARGET_S,
        "within_target": result["seconds"] + examples_s <= TARGET_S,
        "load_avg_1m_before": round(load_before, 2),  # the machine is shared: contention shows here
    }
    if not args.no_baseline:
        baseline = run(lm, examples, replace(config, mixed_precision="no"))
        report["baseline_fp32"] = baseline
        report["speedup_vs_fp32"] = round(baseline["seconds"] / result["seconds"], 2)
    report["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
