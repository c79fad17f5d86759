"""Bench: seconds to plan a retrain's retrieval (training/examples.retrieval_plan: for each item trained on, BM25
over that user's EARLIER items only) on synthetic histories, as a retrain plans it (the most recent
OPPU_TRAIN_MAX_EXAMPLES items) and as the shared retrain does (a sample per user), and every item.

The code before (a fresh index per item, quadratic) is timed beside it on the smaller sizes (--baseline-sizes).

Usage: .venv/bin/python bench/retrieval_plan.py [--sizes 1000,4000,20000] [--big 100000] [--out FILE.json]
Prints ONE JSON object (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine_record  # noqa: E402
from service.config import Settings  # noqa: E402
from service.prompts import training_request  # noqa: E402
from service.retrieval.bm25 import BM25Index, doc_terms  # noqa: E402
from service.training.examples import retrieval_plan  # noqa: E402


@dataclass(frozen=True)
class Item:
    id: str
    input: str | None
    output: str
    kind: str | None = None


def history(n: int, seed: int = 0) -> list[Item]:
    """n items of 12 + 30 words from a 3,000-word vocabulary (a review-like length and overlap)."""
    rng = random.Random(seed)
    words = [f"w{j}" for j in range(3000)]
    return [Item(str(i), " ".join(rng.choices(words, k=12)), " ".join(rng.choices(words, k=30))) for i in range(n)]


def timed(items: list[Item], positions: list[int] | None) -> float:
    started = time.perf_counter()
    retrieval_plan(items, k=1, positions=positions)
    return round(time.perf_counter() - started, 3)


def timed_fresh_index_per_item(items: list[Item]) -> float:
    """The code before: a fresh index over items[:i] for every item i (same plan, quadratic)."""
    started = time.perf_counter()
    corpus = doc_terms(items)
    for i, item in enumerate(items):
        BM25Index.from_terms(corpus[:i]).top_k(training_request(item), 1)
    return round(time.perf_counter() - started, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000,20000", help="histories planned for every item")
    parser.add_argument("--big", type=int, default=100_000, help="a history planned as a retrain and a shared one")
    parser.add_argument("--baseline-sizes", default="1000,2000", help="also planned the way the code before did")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = Settings()
    out: dict[str, object] = {
        "bench": "training.retrieval_plan",
        "command": " ".join(["bench/retrieval_plan.py", *sys.argv[1:]]),
        "machine": machine_record(),
        "every_item_s": {n: timed(history(int(n)), None) for n in args.sizes.split(",")},
        "every_item_fresh_index_per_item_s": {
            n: timed_fresh_index_per_item(history(int(n))) for n in args.baseline_sizes.split(",") if n
        },
    }
    big = history(args.big)
    recent = list(range(max(0, args.big - settings.train_max_examples), args.big))
    sample = sorted(random.Random(1).sample(range(args.big), min(args.big, settings.train_shared_max_per_user)))
    out[f"{args.big}_items"] = {
        f"retrain_last_{len(recent)}_s": timed(big, recent),
        f"shared_sample_{len(sample)}_s": timed(big, sample),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
