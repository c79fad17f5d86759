"""Re-read committed MovieLens reports with the current statistics (user-level paired bootstrap, readouts
chosen on dev, within/between-user correlations) and the recommender baselines (user median, user mean +
shrunk item bias; each continuous or rounded to the rating grid, chosen on dev), without retraining: the splits
are rebuilt from each report's config and checked item by item, the baselines are recomputed from the data.

Usage: .venv/bin/python bench/personalization_reread.py REPORT.json [--dev DEV.json] [--out FILE.json] [--data DIR]
Prints the Markdown tables; --out writes the analysis as JSON. Several REPORTs share one --dev, which must be a
dev run of the same users and items as each REPORT's dev split (a test report is refused).
A REPORT (or DEV) may be a run folder (OUT.run/) of an unfinished run: it is read as an INTERIM report of the
users finished so far (labelled so in the output), with baselines and dev choices on those users only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.evaluation import analysis
from service.evaluation import movielens as ml
from service.evaluation.protocol import default_data_dir
from service.evaluation.reread import interim_report, reread


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return interim_report(path)
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def readouts_chosen_on(report: Mapping[str, Any], path: Path, dev: Path | None) -> str:
    """Where the LLM readouts of `report` were chosen: a dev report reads its own; a test report the --dev
    report (checked by `reread` to be a dev run of the same users), else none: they were set a priori."""
    if int(report["config"].get("holdout", 0)) > 0:
        return str(path)
    return str(dev) if dev is not None else "not chosen (no --dev report): a priori"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--dev", type=Path, help="the dev report the LLM readouts are chosen on")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument(
        "--pair", action="append", default=[], metavar="A:B", help="also compare these keys (post hoc, labelled)"
    )
    args = parser.parse_args()
    data = ml.load_movielens(args.data or default_data_dir())
    dev = _read(args.dev) if args.dev else None
    out: dict[str, Any] = {}
    for path in args.reports:
        report = _read(path)
        result = reread(report, data, dev_report=dev, resamples=args.resamples)
        if "interim" in report:
            result["interim"] = report["interim"]
        pairs = [tuple(p.split(":", 1)) for p in args.pair]
        rows = analysis.Rows.from_report(report["predictions"])
        rows.preds.update(result["baseline_predictions"])
        result["post_hoc"] = analysis.compare(rows, pairs, resamples=args.resamples, seed=0)
        result["readouts_chosen_on"] = readouts_chosen_on(report, path, args.dev)
        out[path.name] = result
        interim = report.get("interim")
        label = f" (INTERIM: {interim['users_finished']} of {interim['users_planned']} users)" if interim else ""
        print(f"## {path.name}{label}\n\n{result['markdown']}\n")
        for c in result["post_hoc"]:
            u, i = c["user_ci"], c["item_ci"]
            print(
                f"post hoc {c['a']} vs {c['b']}: {c['mean_diff']:+.3f} users [{u[0]:+.3f}, {u[1]:+.3f}] "
                f"items [{i[0]:+.3f}, {i[1]:+.3f}]"
            )
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
