"""Re-reading a committed MovieLens report with the current statistics and baselines, without a rerun:
the split is rebuilt from the report's own config (and checked item by item against its prediction rows),
the baselines are recomputed from the data, and everything the statistics choose is chosen on dev.

Pure data code over report dicts and `movielens` records; no models, no server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.evaluation import analysis, baselines
from service.evaluation import movielens as ml
from service.evaluation.metrics import score_predictions
from service.evaluation.protocol import REFERENCE


def task_of(data: ml.MovieLens, config: Mapping[str, Any], *, holdout: int) -> ml.RatingTask:
    """The split a report was run on (or its dev split, with holdout = test_items), from the report config."""
    history, test = int(config["history_items"]), int(config["test_items"])
    return ml.build_rating_task(
        data,
        n_users=int(config["users"]),
        history_items=history,
        test_items=test,
        min_ratings=int(config.get("min_ratings") or history + test),
        seed=int(config["seed"]),
        holdout=holdout,
    )


def baseline_block(
    data: ml.MovieLens, task: ml.RatingTask, dev_task: ml.RatingTask, index: baselines.RatingIndex | None = None
) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """(baseline predictions on `task`, every baseline's MAE on `dev_task`, the shrinkage chosen on dev)."""
    index = index or baselines.RatingIndex(data)
    shrinkage = baselines.choose_shrinkage(dev_task, index)
    dev_golds = [t.rating for s in dev_task.users for t in s.test]
    dev_preds = baselines.predictions(dev_task, index, shrinkage=shrinkage)
    dev_mae = {n: score_predictions(dev_golds, list(p)).mae for n, p in dev_preds.items()}
    return baselines.predictions(task, index, shrinkage=shrinkage), dev_mae, shrinkage


def check_rows(task: ml.RatingTask, rows: list[Mapping[str, Any]]) -> None:
    expected = [(s.user_id, t.item_id, t.rating) for s in task.users for t in s.test]
    got = [(str(r["user"]), str(r["item"]), float(r["gold"])) for r in rows]
    if expected != got:
        raise ValueError("the report's prediction rows are not the split rebuilt from its config")


def llm_methods(report: Mapping[str, Any]) -> list[str]:
    return [str(m) for m in report["config"]["methods"]]


def reread(
    report: Mapping[str, Any],
    data: ml.MovieLens,
    *,
    dev_report: Mapping[str, Any] | None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The analysis of `report` (a test or dev run), with LLM readouts chosen on `dev_report` (None: on the
    report itself when it is a dev run, else a priori) and baselines chosen on the rebuilt dev split."""
    config = report["config"]
    holdout = int(config.get("holdout", 0))
    task = task_of(data, config, holdout=holdout)
    check_rows(task, report["predictions"])
    is_dev = holdout > 0
    dev_task = task if is_dev else task_of(data, config, holdout=int(config["test_items"]))
    base, dev_mae, shrinkage = baseline_block(data, task, dev_task)
    rows = analysis.Rows.from_report(report["predictions"])
    for name, preds in base.items():
        rows.preds[name] = list(preds)
    choice_mae = dict(dev_mae)
    source = report if is_dev else dev_report
    if source is not None:
        dev_rows = analysis.Rows.from_report(source["predictions"])
        choice_mae.update({k: v for k, v in dev_rows.maes().items() if k not in baselines.NAMES})
    out = analysis.analyse(
        rows,
        llm_methods(report),
        reference=REFERENCE,
        dev_mae=choice_mae,
        dev_is_this_split=is_dev,
        resamples=resamples,
        seed=seed,
    )
    out["baseline_predictions"] = base
    out["baseline_shrinkage"] = {"value": shrinkage, "chosen_on": "dev split (rebuilt from the data)"}
    return out
