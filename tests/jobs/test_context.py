"""jobs/context: the training model's merged shared LoRA stays what it says it is."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from service.engine.types import AdapterRef
from service.jobs import context as context_module
from service.jobs.context import JobContext


def test_a_shared_lora_that_fails_to_load_leaves_the_plain_base_named_as_such(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # v1 was unmerged before v2's read failed, but the context still named v1 as merged: a later job on v1
    # trained on the plain base while its adapter recorded shared_version=1.
    model = SimpleNamespace(w=torch.zeros(1))

    def read(directory: Path, **_: Any) -> Any:
        if directory.name == "v2":
            raise FileNotFoundError("v2 pruned")
        return directory.name

    def merge(m: Any, _weights: Any) -> dict[str, torch.Tensor]:
        original = m.w.clone()
        m.w.add_(1.0)
        return {"w": original}

    def unmerge(m: Any, originals: dict[str, torch.Tensor]) -> None:
        for t in originals.values():
            m.w.copy_(t)

    monkeypatch.setattr(context_module, "read_adapter_dir", read)
    monkeypatch.setattr(context_module, "merge_lora", merge)
    monkeypatch.setattr(context_module, "unmerge", unmerge)
    ctx = JobContext.__new__(JobContext)
    ctx.settings = SimpleNamespace(adapter_max_scale=4.0)  # type: ignore[assignment]
    ctx._loaded = SimpleNamespace(model=model)  # type: ignore[assignment]
    ctx._spec = object()  # type: ignore[assignment]
    ctx._shared, ctx._shared_originals = None, {}
    v1 = AdapterRef("shared", 1, "a" * 64, tmp_path / "v1")
    v2 = AdapterRef("shared", 2, "b" * 64, tmp_path / "v2")
    assert ctx.training_model(v1).w.item() == 1.0
    with pytest.raises(FileNotFoundError):
        ctx.training_model(v2)
    assert ctx.training_model(v1).w.item() == 1.0  # merged again, not assumed
