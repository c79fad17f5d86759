"""Bench: personalization on MovieLens (LaMP-3 style rating task): does OPPU beat retrieval and the
non-personalized model? Every method, baselines included (global/user mean, non-personalized, RAG k=1/4,
PAG), is measured in the same run on the same test items; prints ONE JSON object (the report of
`oppu eval movielens`, without the per-item predictions unless --out is given).

Usage: .venv/bin/python bench/personalization.py [--preset small|full|activity|large] [--out FILE.json]
       [--split test|dev] [--users N ...] [--run-dir DIR] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from service.config import Settings
from service.evaluation.protocol import PRESETS, parse_settings, preset_config
from service.evaluation.report import write_report
from service.evaluation.runner import run_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", help="also write the full report (with per-item predictions) here")
    parser.add_argument("--data", help="MovieLens latest-small folder")
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int, dest="history_items")
    parser.add_argument("--test-items", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--model")
    parser.add_argument("--split", choices=["test", "dev"], help="dev: score the ratings just before the test items")
    parser.add_argument("--run-dir", help="per-user results are written here as they finish (default: OUT.run)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run kept in the run folder")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any EvalConfig field")
    args = parser.parse_args()
    options = ("users", "history_items", "test_items", "epochs", "seed", "model", "split")
    overrides = {**parse_settings(args.set), **{k: getattr(args, k) for k in options if getattr(args, k) is not None}}
    config = preset_config(args.preset, progress=sys.stderr.isatty(), **overrides)
    load_before = os.getloadavg()[0]
    run_dir = args.run_dir or (args.out + ".run" if args.out else None)
    report: dict[str, Any] = run_eval(
        config, data_dir=args.data, settings=Settings(), run_dir=run_dir, resume=args.resume
    )
    if args.out:
        write_report(report, args.out)
    summary = {k: v for k, v in report.items() if k != "predictions"}
    summary["bench"] = "personalization.movielens"
    # The machine may be shared: contention shows in these, not in the metrics.
    summary["load_avg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
