"""Re-reading a committed report: the split is rebuilt from its config and checked row by row; baselines come
from the data, the readout from the dev report."""

from __future__ import annotations

from typing import Any

import pytest

from service.evaluation import movielens as ml
from service.evaluation.reread import reread


def _data() -> ml.MovieLens:
    movies = {i: ml.Movie(i, f"Movie {i}", ("Drama",)) for i in range(1, 11)}
    ratings = {
        u: [ml.Rating(m, 0.5 + ((u + 3 * m) % 10) * 0.5, 100 * m + u) for m in range(1, 11)] for u in range(1, 4)
    }
    return ml.MovieLens(movies=movies, ratings=ratings, tags={})


def _report(data: ml.MovieLens, holdout: int, m: float, m_ev: float) -> dict[str, Any]:
    config = {"users": 2, "history_items": 4, "test_items": 2, "min_ratings": 8, "seed": 0, "holdout": holdout}
    task = ml.build_rating_task(data, n_users=2, history_items=4, test_items=2, min_ratings=8, seed=0, holdout=holdout)
    rows = [
        {"user": s.user_id, "item": t.item_id, "gold": t.rating, "pred": {"user_mean": 0.0, "m": m, "m_ev": m_ev}}
        for s in task.users
        for t in s.test
    ]
    return {"config": {**config, "methods": {"m": {}}}, "predictions": rows}


def test_reread_chooses_on_dev_and_checks_the_rows() -> None:
    data = _data()
    dev = _report(data, 2, m=1.0, m_ev=3.0)  # on dev the expected value is closer
    test = _report(data, 0, m=3.0, m_ev=1.0)
    out = reread(test, data, dev_report=dev, resamples=50)
    assert out["readouts"]["m"]["readout"] == "ev" and out["readouts"]["m"]["chosen_on"] == "dev split"
    assert out["methods"]["user_mean"]["mae"] > 0  # recomputed from the data, not the report's 0.0
    assert out["strongest_baseline"]["chosen_on"] == "dev split"
    assert out["comparisons"][0]["a"] == "m_ev" and out["comparisons"][0]["n_users"] == 2
    test["predictions"][0]["gold"] += 0.5
    with pytest.raises(ValueError, match="not the split rebuilt"):
        reread(test, data, dev_report=dev, resamples=50)
