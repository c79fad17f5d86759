"""The parts of a personalization report that are not statistics: the training summary and the JSON file.
The statistics and comparisons are `analysis`'s."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def training_summary(
    shared: Mapping[str, Any], users: Sequence[Mapping[str, Any]], profiles: Mapping[str, str | None]
) -> dict[str, Any]:
    """training_report from the summaries a run folder keeps (so a resumed run reports the same)."""
    texts = [p for p in profiles.values() if p]
    n = max(1, len(users))
    return {
        "shared": {k: shared[k] for k in ("examples", "steps", "epoch_losses", "compute_dtype")},
        "user": {
            "adapters": len(users),
            "mean_examples": sum(u["examples"] for u in users) / n,
            "mean_steps": sum(u["steps"] for u in users) / n,
            "mean_first_epoch_loss": sum(u["epoch_losses"][0] for u in users) / n,
            "mean_final_loss": sum(u["final_loss"] for u in users) / n,
        },
        "profiles": {"generated": len(texts), "mean_chars": sum(map(len, texts)) / max(1, len(texts))},
    }


def write_report(report: Mapping[str, Any], path: Path | str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
