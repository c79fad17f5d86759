"""bench/personalization_large.py: the item-context choice for the test runs follows its stated rule (OPPU+RAG's
dev MAE at its dev-chosen readout; a tie keeps it off), and the runs come in their order, each resumed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.personalization_large import DEV, DEV_CTX, TEST, choose, main


def _dev(readout: str, mae: float) -> dict[str, Any]:
    key = "oppu_rag" if readout == "greedy" else f"oppu_rag_{readout}"
    return {"readouts": {"oppu_rag": {"readout": readout}}, "methods": {key: {"mae": mae}, "oppu_rag": {"mae": 9.0}}}


@pytest.mark.parametrize(("off", "on", "context"), [(0.80, 0.75, True), (0.75, 0.80, False), (0.75, 0.75, False)])
def test_item_context_is_chosen_by_oppu_rag_dev_mae_at_its_readout(
    tmp_path: Path, off: float, on: float, context: bool
) -> None:
    (tmp_path / f"{DEV}.json").write_text(json.dumps(_dev("median", off)))
    (tmp_path / f"{DEV_CTX}.json").write_text(json.dumps(_dev("ev", on)))
    choice = choose(tmp_path)
    assert choice["item_context"] is context
    assert choice["oppu_rag_dev"]["item_context_off"] == {"readout": "median", "mae": off}
    assert choice["dev_report"].endswith(f"{DEV_CTX if context else DEV}.json")


def test_the_next_run_is_resumed_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / f"{DEV}.json").write_text(json.dumps(_dev("median", 0.8)))
    (tmp_path / f"{DEV_CTX}.json.run").mkdir()
    (tmp_path / f"{DEV_CTX}.json.run" / "run.json").write_text("{}")
    monkeypatch.setattr("sys.argv", ["personalization_large.py", "--dir", str(tmp_path), "--dry-run"])
    main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("done")
    assert "--split dev --set item_context=true" in lines[1] and lines[1].endswith("--resume")
    assert len(lines) == 2 and not (tmp_path / "choice.json").exists()  # no choice before both dev reports
    assert not (tmp_path / f"{TEST}.json").exists()
