"""LaMP-3 style rating metrics: parsing model answers, MAE/RMSE, paired bootstrap, a markdown table.

Pure arithmetic on numbers and strings; knows nothing about models, tasks or files.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MIN_RATING = 0.5
MAX_RATING = 5.0
# Plain decimals only ("4", "4.", "3.5", ".5"); a leading sign is captured so "-1" is rejected.
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class MetricResult:
    mae: float
    rmse: float
    parse_failure_rate: float
    n: int


@dataclass(frozen=True)
class BootstrapCI:
    mean_diff: float
    low: float
    high: float
    n: int


def parse_rating(text: str, *, min_rating: float = MIN_RATING, max_rating: float = MAX_RATING) -> float | None:
    """The first number in `text` if it lies in [min_rating, max_rating], else None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group(0))
    if not math.isfinite(value) or not min_rating <= value <= max_rating:
        return None
    return value


def _is_failure(pred: float | None, min_rating: float, max_rating: float) -> bool:
    return pred is None or not math.isfinite(pred) or not min_rating <= pred <= max_rating


def absolute_errors(
    golds: Sequence[float],
    preds: Sequence[float | None],
    *,
    min_rating: float = MIN_RATING,
    max_rating: float = MAX_RATING,
) -> list[float]:
    """|gold - pred| per item; a missing or out-of-range prediction counts as the farthest rating."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    errors: list[float] = []
    for i, (gold, pred) in enumerate(zip(golds, preds, strict=True)):
        if not min_rating <= gold <= max_rating:
            raise ValueError(f"gold[{i}] = {gold} is outside [{min_rating}, {max_rating}]")
        if pred is None or _is_failure(pred, min_rating, max_rating):
            # As LaMP does: an unusable answer is scored as the worst possible rating.
            errors.append(max(abs(gold - min_rating), abs(gold - max_rating)))
        else:
            errors.append(abs(gold - pred))
    return errors


def score_predictions(
    golds: Sequence[float],
    preds: Sequence[float | None],
    *,
    min_rating: float = MIN_RATING,
    max_rating: float = MAX_RATING,
) -> MetricResult:
    errors = absolute_errors(golds, preds, min_rating=min_rating, max_rating=max_rating)
    if not errors:
        raise ValueError("cannot score an empty set of predictions")
    n = len(errors)
    failures = sum(_is_failure(p, min_rating, max_rating) for p in preds)
    return MetricResult(
        mae=sum(errors) / n,
        rmse=math.sqrt(sum(e * e for e in errors) / n),
        parse_failure_rate=failures / n,
        n=n,
    )


def paired_bootstrap_ci(
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapCI:
    """Percentile CI for mean(errors_a - errors_b), resampling items with replacement.

    Negative values mean method a has the lower error. Same inputs and seed give the same interval.
    """
    if len(errors_a) != len(errors_b):
        raise ValueError(f"paired samples differ in length: {len(errors_a)} vs {len(errors_b)}")
    if not errors_a:
        raise ValueError("cannot bootstrap an empty sample")
    if n_resamples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError("n_resamples must be >= 1 and alpha in (0, 1)")
    diffs = [a - b for a, b in zip(errors_a, errors_b, strict=True)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    low_idx = min(n_resamples - 1, max(0, math.floor(alpha / 2 * n_resamples)))
    high_idx = min(n_resamples - 1, max(0, math.ceil((1 - alpha / 2) * n_resamples) - 1))
    return BootstrapCI(mean_diff=sum(diffs) / n, low=means[low_idx], high=means[high_idx], n=n)


def markdown_table(methods: Mapping[str, MetricResult]) -> str:
    """One row per method, in the mapping's order."""
    lines = [
        "| method | n | MAE | RMSE | parse failures |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in methods.items():
        lines.append(f"| {name} | {r.n} | {r.mae:.4f} | {r.rmse:.4f} | {r.parse_failure_rate:.1%} |")
    return "\n".join(lines)
