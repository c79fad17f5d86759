"""Scoring and the report of a personalization run: per-method metrics, paired bootstrap CIs against
the reference method, the Markdown table and the JSON file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.evaluation import metrics
from service.evaluation import movielens as ml
from service.evaluation.protocol import comparisons
from service.training.trainer import TrainOutput


def score(
    golds: Sequence[float], preds: Mapping[str, Sequence[float | None]], *, resamples: int, seed: int
) -> tuple[dict[str, metrics.MetricResult], dict[str, metrics.BootstrapCI]]:
    """Per-method metrics, and for each comparison "a vs b" the paired bootstrap CI of mean(|err a| - |err b|):
    oppu_rag against the other methods of its readout (greedy, or expected value) and the baselines. A
    negative difference means oppu_rag has the lower error."""
    results = {name: metrics.score_predictions(golds, p) for name, p in preds.items()}
    errors = {name: metrics.absolute_errors(golds, p) for name, p in preds.items()}
    ci = {
        f"{a} vs {b}": metrics.paired_bootstrap_ci(errors[a], errors[b], n_resamples=resamples, seed=seed)
        for a, b in comparisons(list(preds))
    }
    return results, ci


def markdown_report(results: Mapping[str, metrics.MetricResult], ci: Mapping[str, metrics.BootstrapCI]) -> str:
    lines = [
        metrics.markdown_table(results),
        "",
        "| comparison | mean abs-error diff | 95% CI (paired bootstrap) | n |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {n} | {c.mean_diff:+.4f} | [{c.low:+.4f}, {c.high:+.4f}] | {c.n} |" for n, c in ci.items()]
    return "\n".join(lines)


def training_report(
    shared: TrainOutput, users: Sequence[TrainOutput], profiles: Mapping[str, str | None]
) -> dict[str, Any]:
    texts = [p for p in profiles.values() if p]
    return {
        "shared": {"examples": shared.examples, "steps": shared.steps, "epoch_losses": list(shared.epoch_losses)},
        "user": {
            "adapters": len(users),
            "mean_examples": sum(o.examples for o in users) / max(1, len(users)),
            "mean_first_epoch_loss": sum(o.epoch_losses[0] for o in users) / max(1, len(users)),
            "mean_final_loss": sum(o.final_loss for o in users) / max(1, len(users)),
        },
        "profiles": {"generated": len(texts), "mean_chars": sum(map(len, texts)) / max(1, len(texts))},
    }


def prediction_rows(
    task: ml.RatingTask,
    golds: Sequence[float],
    preds: Mapping[str, Sequence[float | None]],
    raw: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    items = [(split.user_id, item.item_id) for split in task.users for item in split.test]
    return [
        {
            "user": user,
            "item": item,
            "gold": golds[i],
            "pred": {name: p[i] for name, p in preds.items()},
            "raw": {name: r[i] for name, r in raw.items()},
        }
        for i, (user, item) in enumerate(items)
    ]


def write_report(report: Mapping[str, Any], path: Path | str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
