"""Re-reading a committed report: the split is rebuilt from its config and checked row by row; baselines come
from the data, and everything chosen (LLM readouts, the baseline's shrinkage and readout, the strongest
baseline) is chosen on dev. The data make dev and test prefer DIFFERENT choices, so a choice made on test fails
these tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.personalization_reread import readouts_chosen_on
from service.evaluation import movielens as ml
from service.evaluation import protocol
from service.evaluation.reread import reread
from service.evaluation.runner import _read_dev_report

Pred = Callable[[float], float]


def _data() -> ml.MovieLens:
    """Two evaluated users (1, 2) with 8 ratings each: history 3.0 at t 101-104 (users' own movies), dev items
    m5, m6 rated 4.0 at t 210-211, test items m7, m8 rated 3.5 at t 310-311. Three outside users with under 6
    ratings (never drawn): 20 and 21 rate m5-m8 4.0 early, 22 rates three other movies 1.0 early.

    Dev (history m1-m4, mean 3.0; cutoff t 210): other users' mean mu = (4 x 3.0 + 8 x 4.0 + 3 x 1.0) / 15
    = 47/15; m5's bias at shrinkage 0 = 4.0 - 47/15 = 0.867, so user mean + bias = 3.867 (error 0.133), which
    rounds to 4.0 = the gold (error 0): dev prefers shrinkage 0, the rounded readout, and this baseline over
    the user's mean (3.0, error 1).
    Test (history m3-m6, mean 3.5; cutoff t 310): every baseline without the item bias says 3.5 = the gold
    (error 0); the bias (m7 rated 4.0 by the outsiders, mu = 55/17) only hurts, so test would prefer the
    largest shrinkage and the global mean."""
    movies = {i: ml.Movie(i, f"Movie {i}", ("Drama",)) for i in range(1, 40)}
    ratings: dict[int, list[ml.Rating]] = {}
    for u, own in ((1, (1, 2, 3, 4)), (2, (11, 12, 13, 14))):
        history = [ml.Rating(m, 3.0, 100 + i) for i, m in enumerate(own, start=1)]
        dev = [ml.Rating(5, 4.0, 210), ml.Rating(6, 4.0, 211)]
        ratings[u] = [*history, *dev, ml.Rating(7, 3.5, 310), ml.Rating(8, 3.5, 311)]
    for u in (20, 21):
        ratings[u] = [ml.Rating(m, 4.0, m) for m in (5, 6, 7, 8)]
    ratings[22] = [ml.Rating(m, 1.0, m) for m in (30, 31, 32)]
    return ml.MovieLens(movies=movies, ratings=ratings, tags={})


CONFIG = {"users": 2, "history_items": 4, "test_items": 2, "min_ratings": 6, "seed": 0}


def _report(data: ml.MovieLens, holdout: int, greedy: Pred, ev: Pred) -> dict[str, Any]:
    task = ml.build_rating_task(data, n_users=2, history_items=4, test_items=2, min_ratings=6, seed=0, holdout=holdout)
    rows = [
        {
            "user": s.user_id,
            "item": t.item_id,
            "gold": t.rating,
            "pred": {"user_mean": 1.0, "m": greedy(t.rating), "m_ev": ev(t.rating)},
        }
        for s in task.users
        for t in s.test
    ]
    return {"config": {**CONFIG, "holdout": holdout, "methods": {"m": {}}}, "predictions": rows}


def _exact(gold: float) -> float:
    return gold


def _off(gold: float) -> float:
    return gold + 1.0


def test_reread_chooses_everything_on_dev_and_checks_the_rows() -> None:
    data = _data()
    dev = _report(data, 2, greedy=_off, ev=_exact)  # on dev the expected value is exact, greedy 1 off
    test = _report(data, 0, greedy=_exact, ev=_off)  # on test the other way round
    out = reread(test, data, dev_report=dev, resamples=50)
    assert out["readouts"]["m"] == {"readout": "ev", "chosen_on": "dev split", "dev_mae": {"greedy": 1.0, "ev": 0.0}}
    assert out["baseline_shrinkage"]["value"] == 0.0  # dev's choice; test would take the largest
    bias = out["baseline_readouts"]["user_mean_item_bias"]
    assert bias["readout"] == "rounded" and bias["dev_mae"] == {"continuous": pytest.approx(2 / 15), "rounded": 0.0}
    strongest = out["strongest_baseline"]
    assert strongest["name"] == "user_mean_item_bias_round" and strongest["chosen_on"] == "dev split"
    assert out["methods"]["user_mean"]["mae"] == 0.0  # recomputed from the data (3.5), not the report's 1.0
    first = out["comparisons"][0]
    assert (first["a"], first["b"], first["n_users"]) == ("m_ev", "user_mean_item_bias_round", 2)
    # m_ev is 1.0 off; on test the bias baseline says 3.5 + (4.0 - 55/17) = 4.26, rounded 4.5: also 1.0 off
    assert first["mean_diff"] == pytest.approx(0.0)
    test["predictions"][0]["gold"] += 0.5
    with pytest.raises(ValueError, match="not the split rebuilt"):
        reread(test, data, dev_report=dev, resamples=50)


def test_reread_refuses_a_dev_report_that_is_not_this_runs_dev_split() -> None:
    data = _data()
    test = _report(data, 0, greedy=_exact, ev=_off)
    with pytest.raises(ValueError, match="test-split report"):  # the test report itself as --dev
        reread(test, data, dev_report=test, resamples=50)
    relabelled = {**test, "config": {**test["config"], "holdout": 2}}  # test items labelled as a dev run
    with pytest.raises(ValueError, match="not this run's dev split"):
        reread(test, data, dev_report=relabelled, resamples=50)
    dev = _report(data, 2, greedy=_off, ev=_exact)
    one_user = {**dev, "predictions": dev["predictions"][:2]}
    with pytest.raises(ValueError, match="not a dev report of this run's users"):
        reread(test, data, dev_report=one_user, resamples=50)
    # an unfinished dev run (interim) is checked against the users it finished
    interim = {**one_user, "interim": {"users_finished": 1}}
    assert reread(test, data, dev_report=interim, resamples=50)["readouts"]["m"]["readout"] == "ev"


def test_runner_refuses_a_test_report_as_its_dev_report(tmp_path: Path) -> None:
    data = _data()
    test = _report(data, 0, greedy=_exact, ev=_off)
    reports = {
        "dev": _report(data, 2, greedy=_off, ev=_exact),
        "test": test,
        "relabelled": {**test, "config": {**test["config"], "holdout": 2}},  # same users, the test items
    }
    for name, report in reports.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))

    def config(name: str) -> protocol.EvalConfig:
        path = str(tmp_path / f"{name}.json")
        return protocol.EvalConfig(users=2, history_items=4, test_items=2, min_ratings=6, dev_report=path)

    _, dev_task, _ = protocol.build_tasks(data, config("dev"))
    with pytest.raises(ValueError, match="test-split report"):
        _read_dev_report(config("test"), dev_task)
    with pytest.raises(ValueError, match="not this run's dev split"):
        _read_dev_report(config("relabelled"), dev_task)
    assert _read_dev_report(config("dev"), dev_task)["config"]["holdout"] == 2


def test_the_tool_labels_where_the_readouts_were_chosen() -> None:
    test, dev = Path("test.json"), Path("dev.json")
    old = {"config": {"seed": 0}}  # an early report: no holdout recorded (a test run)
    assert readouts_chosen_on(old, test, dev) == "dev.json"
    assert "a priori" in readouts_chosen_on(old, test, None)  # never the test report's own path
    assert readouts_chosen_on({"config": {"holdout": 2}}, dev, None) == "dev.json"  # a dev run: its own rows
