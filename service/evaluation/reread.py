"""Re-reading a committed MovieLens report with the current statistics and baselines, without a rerun:
the split is rebuilt from the report's own config (and checked item by item against its prediction rows),
the baselines are recomputed from the data, and everything the statistics choose is chosen on dev: the dev
report the LLM readouts are chosen on must be a dev run of the same users and items (`protocol.check_dev_report`).

Pure data code over report dicts and `movielens` records; no models, no server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from service.evaluation import analysis, baselines, protocol
from service.evaluation import movielens as ml
from service.evaluation.metrics import score_predictions
from service.evaluation.protocol import REFERENCE


def tasks_of(data: ml.MovieLens, config: Mapping[str, Any]) -> tuple[ml.RatingTask, ml.RatingTask]:
    """(the split a report or run folder was scored on, its dev split), rebuilt by the run's own rule."""
    run = replace(protocol.config_of(config), item_context=False, shared_pool="evaluated")  # only the splits
    task, dev_task, _ = protocol.build_tasks(data, run)
    return task, dev_task


def _only(task: ml.RatingTask, users: set[str]) -> ml.RatingTask:
    return ml.RatingTask([s for s in task.users if s.user_id in users])


def baseline_block(
    data: ml.MovieLens, task: ml.RatingTask, dev_task: ml.RatingTask, index: baselines.RatingIndex | None = None
) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """(baseline predictions on `task` at every readout, every baseline's MAE on `dev_task` at every readout,
    the shrinkage chosen on dev)."""
    index = index or baselines.RatingIndex(data)
    shrinkage = baselines.choose_shrinkage(dev_task, index)
    dev_golds = [t.rating for s in dev_task.users for t in s.test]
    dev_preds = baselines.predictions(dev_task, index, shrinkage=shrinkage)
    dev_mae = {n: score_predictions(dev_golds, list(p)).mae for n, p in dev_preds.items()}
    return baselines.predictions(task, index, shrinkage=shrinkage), dev_mae, shrinkage


def check_rows(task: ml.RatingTask, rows: list[Mapping[str, Any]]) -> None:
    if protocol.report_rows(rows) != protocol.scored_rows(task):
        raise ValueError("the report's prediction rows are not the split rebuilt from its config")


def llm_methods(report: Mapping[str, Any]) -> list[str]:
    return [str(m) for m in report["config"]["methods"]]


def _check_dev(dev_report: Mapping[str, Any], dev_task: ml.RatingTask) -> None:
    """A dev report, checked against the whole rebuilt dev split (an interim one: against its finished users)."""
    if dev_report.get("interim"):
        dev_task = _only(dev_task, {str(r["user"]) for r in dev_report["predictions"]})
    protocol.check_dev_report(dev_report, dev_task)


def reread(
    report: Mapping[str, Any],
    data: ml.MovieLens,
    *,
    dev_report: Mapping[str, Any] | None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The analysis of `report` (a test or dev run), with LLM readouts chosen on `dev_report` (None: on the
    report itself when it is a dev run, else a priori) and baselines chosen on the rebuilt dev split. A
    `dev_report` that is not a dev run of the same users and items raises ValueError."""
    config = report["config"]
    task, dev_task = tasks_of(data, config)
    if dev_report is not None:
        _check_dev(dev_report, dev_task)
    if report.get("interim"):  # a run folder read before its last user: the users finished so far
        done = {str(r["user"]) for r in report["predictions"]}
        task, dev_task = _only(task, done), _only(dev_task, done)
    check_rows(task, report["predictions"])
    is_dev = int(config.get("holdout", 0)) > 0
    base, dev_mae, shrinkage = baseline_block(data, task, dev_task)
    rows = analysis.Rows.from_report(report["predictions"])
    for name, preds in base.items():
        rows.preds[name] = list(preds)
    choice_mae = dict(dev_mae)
    source = report if is_dev else dev_report
    if source is not None:
        dev_rows = analysis.Rows.from_report(source["predictions"])
        choice_mae.update({k: v for k, v in dev_rows.maes().items() if k not in baselines.KEYS})
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


def interim_report(run_dir: Path) -> dict[str, Any]:
    """A run folder (OUT.run/) read as a report before its run has finished: the prediction rows of the users
    finished so far, under the run's config, marked `interim` so `reread` scores those users only (baselines
    and the dev choices on the same users). For a look at a long run while it runs, or a partial result
    committed honestly as partial; the run's own report is the result."""
    manifest = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    config = protocol.config_of(manifest["config"])
    files = sorted((run_dir / "users").glob("[0-9]*.json")) if (run_dir / "users").is_dir() else []
    results = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    return {
        "interim": {"users_finished": len(results), "users_planned": config.users, "run_dir": str(run_dir)},
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "progress"},
            "holdout": config.holdout,
            "dtype": manifest.get("dtype"),
            "methods": {m.name: asdict(m) for m in config.methods()},
        },
        "training": [r["training"] for r in results],
        "timing": {"per_user_s": [round(r["timing"]["train_s"] + r["timing"]["methods_s"], 2) for r in results]},
        "predictions": [row for r in results for row in r["rows"]],
    }
