"""The baselines a recommender would use, on the same split as the LLM methods and with no test leakage:
the user's history mean and median, a per-user genre model, the user's mean plus a shrunk item bias, and the
global mean. Each is offered at two readouts, like the LLM methods: its continuous value and that value rounded
to the nearest step of the 0.5 rating grid (`_round`); the readout is chosen on the dev split.

The item bias of a user's test item reads ONLY other users' ratings made strictly before that user's first
scored rating (the cutoff), so nothing from the scored period, and nothing of the user's own, is used;
the shrinkage is chosen on the dev split. Pure data code over `movielens` records; no models, no files.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.evaluation import movielens as ml
from service.evaluation import stats
from service.evaluation.metrics import MAX_RATING, MIN_RATING

SHRINKAGE_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0)
NAMES = ("global_mean", "user_mean", "user_median", "user_mean_genre", "user_mean_item_bias")
GENRE_SHRINKAGE = 5.0  # fixed a priori (not tuned): a genre seen in 5 history items moves halfway
# A baseline's readouts -> key suffix, in tie-break order (a tie keeps the baseline's own, continuous value).
READOUTS = {"continuous": "", "rounded": "_round"}
RATING_STEP = 0.5  # MovieLens ratings are 0.5..5.0 in steps of 0.5
KEYS = tuple(n + suffix for n in NAMES for suffix in READOUTS.values())  # every baseline prediction key


def user_median(split: ml.UserSplit, *, fallback: float) -> float:
    """Median of the user's HISTORY ratings (the MAE-optimal constant for that history)."""
    return statistics.median(h.rating for h in split.history) if split.history else fallback


def genre_predictions(split: ml.UserSplit, *, fallback: float, shrinkage: float = GENRE_SHRINKAGE) -> list[float]:
    """A per-user genre model from the HISTORY only: user mean + the mean, over the item's genres, of the
    user's shrunk offset for that genre, d_g = sum(r - mean) / (n_g + shrinkage) over history items of genre g."""
    mean = ml.user_mean(split, fallback=fallback)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for h in split.history:
        for g in h.genres:
            sums[g] = sums.get(g, 0.0) + h.rating - mean
            counts[g] = counts.get(g, 0) + 1
    out = []
    for item in split.test:
        offsets = [sums.get(g, 0.0) / (counts.get(g, 0) + shrinkage) for g in item.genres]
        out.append(_clip(mean + (sum(offsets) / len(offsets) if offsets else 0.0)))
    return out


def _clip(value: float) -> float:
    return min(MAX_RATING, max(MIN_RATING, value))


@dataclass(frozen=True)
class _Timeline:
    """Ratings in time order with running sums, so "everything strictly before t" is one bisect."""

    times: list[int]
    prefix_sum: list[float]  # prefix_sum[i] = sum of the first i ratings

    @classmethod
    def of(cls, rows: Sequence[tuple[int, float]]) -> _Timeline:
        rows = sorted(rows)
        prefix = [0.0]
        for _, r in rows:
            prefix.append(prefix[-1] + r)
        return cls([t for t, _ in rows], prefix)

    def before(self, t: int) -> tuple[int, float]:
        """(count, sum) of the ratings with timestamp < t."""
        i = bisect.bisect_left(self.times, t)
        return i, self.prefix_sum[i]


class RatingIndex:
    """Every rating of the dataset, for "other users, strictly before t" statistics per movie and overall."""

    def __init__(self, data: ml.MovieLens) -> None:
        self._all = _Timeline.of([(r.timestamp, r.rating) for rs in data.ratings.values() for r in rs])
        per_movie: dict[int, list[tuple[int, float]]] = {}
        for rs in data.ratings.values():
            for r in rs:
                per_movie.setdefault(r.movie_id, []).append((r.timestamp, r.rating))
        self._movies = {m: _Timeline.of(rows) for m, rows in per_movie.items()}
        self._users = {u: _Timeline.of([(r.timestamp, r.rating) for r in rs]) for u, rs in data.ratings.items()}
        self._own = {(u, r.movie_id): r for u, rs in data.ratings.items() for r in rs}

    def global_before(self, t: int, *, exclude_user: int) -> tuple[int, float]:
        """(count, sum) of every other user's ratings made strictly before t."""
        n, s = self._all.before(t)
        own = self._users.get(exclude_user)
        if own is not None:
            on, os_ = own.before(t)
            n, s = n - on, s - os_
        return n, s

    def movie_before(self, movie_id: int, t: int, *, exclude_user: int) -> tuple[int, float]:
        """(count, sum) of other users' ratings of the movie made strictly before t."""
        line = self._movies.get(movie_id)
        if line is None:
            return 0, 0.0
        n, s = line.before(t)
        own = self._own.get((exclude_user, movie_id))
        if own is not None and own.timestamp < t:
            n, s = n - 1, s - own.rating
        return n, s


def user_id_number(split: ml.UserSplit) -> int:
    return int(split.user_id.removeprefix("ml_"))


def bias_predictions(task: ml.RatingTask, index: RatingIndex, shrinkage: float) -> list[float]:
    """user mean + b_i per scored item, b_i = sum(r - mu) / (shrinkage + n) over the n ratings of the movie by
    OTHER users strictly before the user's first scored rating, mu the mean of all other users' ratings
    before that same cutoff. Clipped to the rating scale."""
    if shrinkage < 0:
        raise ValueError("shrinkage must be >= 0")
    gmean = ml.global_mean(task)
    out: list[float] = []
    for split in task.users:
        if not split.test:
            continue
        uid, cutoff = user_id_number(split), min(t.timestamp for t in split.test)
        base = ml.user_mean(split, fallback=gmean)
        n_all, s_all = index.global_before(cutoff, exclude_user=uid)
        mu = s_all / n_all if n_all else gmean
        for item in split.test:
            n, s = index.movie_before(item.movie_id, cutoff, exclude_user=uid)
            bias = (s - n * mu) / (shrinkage + n) if shrinkage + n > 0 else 0.0
            out.append(_clip(base + bias))
    return out


def choose_shrinkage(dev_task: ml.RatingTask, index: RatingIndex, grid: Sequence[float] = SHRINKAGE_GRID) -> float:
    """The shrinkage with the lowest MAE on the DEV split (ties: the larger, more conservative value)."""
    golds = [t.rating for s in dev_task.users for t in s.test]

    def mae(lam: float) -> float:
        preds = bias_predictions(dev_task, index, lam)
        return sum(abs(g - p) for g, p in zip(golds, preds, strict=True)) / len(golds)

    return min(grid, key=lambda lam: (mae(lam), -lam))


def to_rating_grid(value: float) -> float:
    """The nearest rating on the 0.5 grid (a value halfway between two ratings goes up), within the scale."""
    return _clip(math.floor(value / RATING_STEP + 0.5) * RATING_STEP)


def readout_key(name: str, readout: str) -> str:
    return name + READOUTS[readout]


def with_readouts(preds: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Each baseline's continuous predictions and, beside them, the same rounded to the rating grid."""
    out = {n: list(p) for n, p in preds.items()}
    for name in NAMES:
        if name in preds:
            out[readout_key(name, "rounded")] = [to_rating_grid(p) for p in preds[name]]
    return out


def choose_readout(dev_mae: Mapping[str, float]) -> str:
    """A baseline's readout with the lowest MAE ON THE DEV SPLIT (readout -> dev MAE; ties: continuous): the
    LLM methods' rule (`stats.choose_readout`) over the baselines' readouts."""
    return stats.choose_readout(dev_mae, order=tuple(READOUTS))


def predictions(task: ml.RatingTask, index: RatingIndex, *, shrinkage: float) -> dict[str, list[float]]:
    """Every baseline's prediction per scored item, in task order (users, then their items), at each readout
    (the key of the rounded readout carries the `_round` suffix)."""
    gmean = ml.global_mean(task)  # history ratings only
    return with_readouts({
        "global_mean": [gmean for split in task.users for _ in split.test],
        "user_mean": [ml.user_mean(split, fallback=gmean) for split in task.users for _ in split.test],
        "user_median": [user_median(split, fallback=gmean) for split in task.users for _ in split.test],
        "user_mean_genre": [p for split in task.users for p in genre_predictions(split, fallback=gmean)],
        "user_mean_item_bias": bias_predictions(task, index, shrinkage),
    })


def strongest(dev_mae: Mapping[str, float]) -> str:
    """The baseline every LLM method is compared with: the lowest MAE on the DEV split among the given
    prediction keys (each baseline at its dev-chosen readout; ties: the earlier of NAMES, then of READOUTS)."""
    known = [k for k in KEYS if k in dev_mae]
    if not known:
        raise ValueError("no baseline scored")
    return min(known, key=lambda k: (dev_mae[k], KEYS.index(k)))
