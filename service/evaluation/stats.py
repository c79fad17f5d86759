"""Statistics of a personalization run that a reviewer would accept: paired bootstrap CIs that resample
USERS (a user's items stay together; item-level CIs only beside them, labelled), readouts of a scored
rating distribution (expected value, median), the readout rule (chosen on dev, never on test), and
within-user / between-user correlations.

Pure arithmetic on numbers and user ids; knows nothing about models, MovieLens or files.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Level = Literal["user", "item"]
READOUTS = ("greedy", "ev", "median")  # tie-break order of the readout rule: the simplest readout wins a tie


@dataclass(frozen=True)
class PairedCI:
    """Percentile CI of mean(|err a| - |err b|) over items; negative = a has the lower error."""

    mean_diff: float
    low: float
    high: float
    n_items: int
    n_users: int
    level: Level  # what was resampled: "user" (the primary CI) or "item" (shown beside it, labelled)

    @property
    def excludes_zero(self) -> bool:
        return self.high < 0.0 or self.low > 0.0


def _percentiles(values: list[float], alpha: float) -> tuple[float, float]:
    values.sort()
    n = len(values)
    low_idx = min(n - 1, max(0, math.floor(alpha / 2 * n)))
    high_idx = min(n - 1, max(0, math.ceil((1 - alpha / 2) * n) - 1))
    return values[low_idx], values[high_idx]


def _check(users: Sequence[str], a: Sequence[float], b: Sequence[float], n_resamples: int, alpha: float) -> None:
    if not len(users) == len(a) == len(b):
        raise ValueError(f"paired samples differ in length: {len(users)} users, {len(a)} vs {len(b)} errors")
    if not a:
        raise ValueError("cannot bootstrap an empty sample")
    if n_resamples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError("n_resamples must be >= 1 and alpha in (0, 1)")


def paired_ci(
    users: Sequence[str],
    errors_a: Sequence[float],
    errors_b: Sequence[float],
    *,
    level: Level = "user",
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedCI:
    """Paired bootstrap of the mean per-item error difference.

    level="user" (cluster bootstrap): draw users with replacement and take every item of each drawn user,
    so the items of one user, which are not independent, never count as separate evidence. The statistic
    is the item mean of the drawn items (the same statistic as the point estimate). level="item" draws
    items, as if every item came from a different user. Same inputs and seed give the same interval.
    """
    _check(users, errors_a, errors_b, n_resamples, alpha)
    diffs = [x - y for x, y in zip(errors_a, errors_b, strict=True)]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for user, d in zip(users, diffs, strict=True):
        sums[user] = sums.get(user, 0.0) + d
        counts[user] = counts.get(user, 0) + 1
    rng = random.Random(seed)
    means: list[float] = []
    if level == "user":
        keys = list(sums)
        n = len(keys)
        for _ in range(n_resamples):
            drawn = [keys[rng.randrange(n)] for _ in range(n)]
            means.append(sum(sums[k] for k in drawn) / sum(counts[k] for k in drawn))
    elif level == "item":
        n = len(diffs)
        means = [sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples)]
    else:
        raise ValueError(f"level must be 'user' or 'item', got {level!r}")
    low, high = _percentiles(means, alpha)
    return PairedCI(sum(diffs) / len(diffs), low, high, len(diffs), len(sums), level)


# --- readouts of a distribution over the rating candidates ---


def normalise(logprobs: Sequence[float]) -> list[float]:
    """Scored log-probabilities of the candidates as probabilities summing to 1 over the candidates."""
    if not logprobs:
        raise ValueError("no candidates scored")
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def expected_value(values: Sequence[float], probs: Sequence[float]) -> float:
    return sum(v * p for v, p in zip(values, probs, strict=True)) / sum(probs)


def median_value(values: Sequence[float], probs: Sequence[float]) -> float:
    """The smallest candidate whose cumulative probability reaches half (values in ascending order): the
    MAE-optimal point answer under the distribution."""
    if list(values) != sorted(values):
        raise ValueError("candidate values must be ascending")
    total = sum(probs)
    cumulative = 0.0
    for value, p in zip(values, probs, strict=True):
        cumulative += p
        if cumulative >= total / 2 - 1e-12:
            return value
    return values[-1]


def choose_readout(dev_mae: Mapping[str, float], order: Sequence[str] = READOUTS) -> str:
    """The readout with the lowest MAE ON THE DEV SPLIT (ties: the earlier of `order`: the LLM methods' READOUTS,
    or a baseline's). The caller passes dev numbers only; the test split then uses the returned readout,
    whatever test would have preferred."""
    known = [r for r in order if r in dev_mae]
    if not known:
        raise ValueError(f"no known readout among {sorted(dev_mae)}")
    return min(known, key=lambda r: (dev_mae[r], list(order).index(r)))


# --- correlations ---


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant (e.g. a per-user constant after centring)."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} vs {len(ys)} values")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-18 or syy <= 1e-18:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def within_user_corr(
    users: Sequence[str], preds: Sequence[float], golds: Sequence[float], history_means: Mapping[str, float]
) -> float | None:
    """Does the method know WHICH items a user likes? Pearson of prediction and gold over all items after
    subtracting each user's history mean from both."""
    xs = [p - history_means[u] for u, p in zip(users, preds, strict=True)]
    ys = [g - history_means[u] for u, g in zip(users, golds, strict=True)]
    return pearson(xs, ys)


def within_user_corr_items_only(users: Sequence[str], preds: Sequence[float], golds: Sequence[float]) -> float | None:
    """The strict form: Pearson after subtracting each user's mean over the SCORED items from predictions and
    golds separately, so a per-user constant (a level, a drift since the history) contributes nothing."""
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        groups.setdefault(u, []).append(i)
    xs, ys = [0.0] * len(users), [0.0] * len(users)
    for idx in groups.values():
        mp = sum(preds[i] for i in idx) / len(idx)
        mg = sum(golds[i] for i in idx) / len(idx)
        for i in idx:
            xs[i], ys[i] = preds[i] - mp, golds[i] - mg
    return pearson(xs, ys)


def between_user_corr(users: Sequence[str], preds: Sequence[float], golds: Sequence[float]) -> float | None:
    """Does the method know HOW HIGH a user rates? Pearson over users of their mean prediction and mean gold."""
    sums: dict[str, list[float]] = {}
    for u, p, g in zip(users, preds, golds, strict=True):
        acc = sums.setdefault(u, [0.0, 0.0, 0.0])
        acc[0] += p
        acc[1] += g
        acc[2] += 1
    return pearson([a[0] / a[2] for a in sums.values()], [a[1] / a[2] for a in sums.values()])
