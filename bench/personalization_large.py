"""The large protocol's runs in their order (docs/eval/large.md), each continued where it stopped: run this again
in every sitting until it says that every report exists. Each step is `oppu eval movielens --preset large ...`
(with --resume when its run folder exists).

1. `dev`: the dev split, item context off; 2. `dev-ctx`: the dev split, item context on;
3. the choice, by a rule fixed before either dev result existed: the test runs use item context if and only if
   OPPU+RAG's dev MAE at its dev-chosen readout is lower with it (a tie: off); that dev report is the test runs'
   `dev_report` (every method's readout is chosen on it). Written to DIR/choice.json;
4. `test`: the test split, once; 5. `h24-test`: the 24-item point, same users and test items.

Usage: .venv/bin/python bench/personalization_large.py [--dir docs/eval/large] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.evaluation.analysis import readout_key
from service.evaluation.protocol import REFERENCE

DEV, DEV_CTX, TEST, H24 = (
    "movielens-large-dev",
    "movielens-large-dev-ctx",
    "movielens-large-test",
    "movielens-large-h24-test",
)
RULE = (
    "item context on for the test runs iff OPPU+RAG's dev MAE at its dev-chosen readout is lower with it (tie: off); "
    "the chosen dev report is the test runs' dev_report"
)


def dev_mae(report: dict[str, Any]) -> tuple[str, float]:
    """(OPPU+RAG's readout chosen on this dev report, its MAE there)."""
    readout = str(report["readouts"][REFERENCE]["readout"])
    return readout, float(report["methods"][readout_key(REFERENCE, readout)]["mae"])


def choose(folder: Path) -> dict[str, Any]:
    off = json.loads((folder / f"{DEV}.json").read_text())
    on = json.loads((folder / f"{DEV_CTX}.json").read_text())
    (r_off, mae_off), (r_on, mae_on) = dev_mae(off), dev_mae(on)
    context = mae_on < mae_off
    return {
        "rule": RULE,
        "oppu_rag_dev": {
            "item_context_off": {"readout": r_off, "mae": mae_off},
            "item_context_on": {"readout": r_on, "mae": mae_on},
        },
        "item_context": context,
        "dev_report": str(folder / f"{DEV_CTX if context else DEV}.json"),
    }


def run(folder: Path, name: str, args: list[str], dry_run: bool) -> bool:
    """Runs (or continues) one report; False when it is not there yet (a dry run)."""
    out = folder / f"{name}.json"
    if out.is_file():
        print(f"{out}: done")
        return True
    resume = ["--resume"] if (folder / f"{name}.json.run" / "run.json").is_file() else []
    command = [sys.executable, "-m", "service.cli", "eval", "movielens", "--preset", "large", *args, "--out", str(out)]
    print(" ".join(command + resume), flush=True)
    if dry_run:
        return False
    subprocess.run(command + resume, check=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("docs/eval/large"))
    parser.add_argument("--dry-run", action="store_true", help="print the next command instead of running it")
    args = parser.parse_args()
    folder: Path = args.dir
    if not run(folder, DEV, ["--split", "dev"], args.dry_run):
        return
    if not run(folder, DEV_CTX, ["--split", "dev", "--set", "item_context=true"], args.dry_run):
        return
    choice_file = folder / "choice.json"
    if not choice_file.is_file():
        choice_file.write_text(json.dumps(choose(folder), indent=2) + "\n", encoding="utf-8")
    choice = json.loads(choice_file.read_text())
    print(f"{choice_file}: item_context={choice['item_context']}, dev_report={choice['dev_report']}")
    chosen = [
        "--set",
        f"item_context={str(choice['item_context']).lower()}",
        "--set",
        f"dev_report={choice['dev_report']}",
    ]
    if not run(folder, TEST, chosen, args.dry_run):
        return
    if run(folder, H24, ["--items", "24", *chosen], args.dry_run):
        print("every report of the large protocol exists")


if __name__ == "__main__":
    main()
