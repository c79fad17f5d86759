"""LoraSlots and adapter weights against PEFT on a tiny random Llama."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from service.adapters.peft_format import read_adapter_dir, read_adapter_files
from service.adapters.slots import LoraSlots, TokenPlan
from tests.factories import ALL, make_adapter, peft_model
from tests.models import tiny_model

MAX_SCALE = 256.0  # the default OPPU_ADAPTER_MAX_SCALE


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=torch.tensor([ids])).logits[0].float()
    return out


PROMPT = [5, 17, 99, 300, 41, 7, 250]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base, root = tiny_model(), tmp_path_factory.mktemp("adapters")
    return {
        "x": make_adapter(base, root / "x", seed=1, r=16, targets=ALL),
        "y": make_adapter(base, root / "y", seed=2, r=2, targets=("q_proj", "v_proj"), rslora=True),
        "patterns": make_adapter(
            base,
            root / "patterns",
            seed=3,
            r=8,
            targets=("q_proj", "v_proj", "up_proj"),
            rank_pattern={"v_proj": 4, "model.layers.1.mlp.up_proj": 2},
            alpha_pattern={"q_proj": 3},
            rslora=True,
        ),
    }


def test_scaling_and_patterns_match_peft(adapters: dict[str, Path]) -> None:
    weights = read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["patterns"])
    reference = peft_model(tiny_model(), adapters["patterns"])
    peft_layers = {
        name.removeprefix("base_model.model."): m for name, m in reference.named_modules() if hasattr(m, "lora_A")
    }
    assert set(weights.modules) == set(peft_layers)
    for path, m in weights.modules.items():
        assert m.scaling == pytest.approx(peft_layers[path].scaling["default"])
        assert m.rank == peft_layers[path].r["default"]
    assert weights.rank == 8
    assert weights.target_modules() == {"q_proj", "v_proj", "up_proj"}
    assert weights.nbytes() == sum(m.a.nbytes + m.b.nbytes for m in weights.modules.values())
    files = {p.name: p.read_bytes() for p in adapters["patterns"].iterdir()}
    from_bytes = read_adapter_files(max_scale=MAX_SCALE, files=files)
    for path, m in weights.modules.items():
        assert torch.equal(from_bytes.modules[path].b, m.b)


def test_slot_swap_follows_latest_adapter_and_clear_restores_base(adapters: dict[str, Path]) -> None:
    base = tiny_model()
    model = copy.deepcopy(base)
    slots = LoraSlots(model, 2, 16, ALL, device="cpu", dtype=torch.float32)
    for name in ("x", "y", "patterns"):  # x (rank 16, all modules) then lower ranks and fewer modules
        slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters[name]))
        with slots.batch([1]):
            got = logits(model, PROMPT)
        torch.testing.assert_close(got, logits(peft_model(base, adapters[name]), PROMPT), atol=1e-5, rtol=1e-5)
    slots.clear(1)
    assert slots.is_empty(1)
    with slots.batch([1]):
        assert torch.equal(logits(model, PROMPT), logits(base, PROMPT))


def test_mixed_rows_and_the_decode_gather_agree(adapters: dict[str, Path]) -> None:
    """Per-row segments (a plain batched forward), the gathered per-row decode path (kept while the rows do
    not change) and the base give the same rows as PEFT."""
    base = tiny_model()
    x_ref = logits(peft_model(base, adapters["x"]), PROMPT)
    y_ref = logits(peft_model(base, adapters["y"]), PROMPT)
    model = copy.deepcopy(base)
    slots = LoraSlots(model, 3, 16, ALL, device="cpu", dtype=torch.float32)
    slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["x"]))
    slots.load(3, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["y"]))
    refs = (x_ref, logits(base, PROMPT), y_ref, x_ref)
    with torch.inference_mode(), slots.batch([1, 0, 3, 1], tokens_per_row=len(PROMPT)):
        out = model(input_ids=torch.tensor([PROMPT] * 4)).logits.float()
    for row, ref in zip(out, refs, strict=True):
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5)
    # One token per row through the decode path: the layer of each Linear is checked directly.
    layer = slots.layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(4, layer.in_features)
    gathers = []
    for _ in range(2):  # the second time from the cached gather (the engine clears the plan between steps)
        slots.set_plan(TokenPlan(decode_slots=(1, 0, 3, 1)))
        got = layer(x)
        gathers.append(layer._gathered)
        slots.set_plan(None)
        for i, s in enumerate((1, 0, 3, 1)):
            r = layer.ranks[s]
            want = layer.base(x[i]) + (x[i] @ layer.A_slots[s, :, :r]) @ layer.B_slots[s, :r]
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert gathers[0] is not None and gathers[1] is gathers[0]
    slots.load(3, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["x"]))  # a slot's weights change
    slots.set_plan(TokenPlan(decode_slots=(1, 0, 3, 1)))
    got = layer(x)
    slots.set_plan(None)
    assert layer._gathered is not gathers[0]
    r = layer.ranks[1]
    want = layer.base(x[2]) + (x[2] @ layer.A_slots[1, :, :r]) @ layer.B_slots[1, :r]  # slot 3 now holds x
    torch.testing.assert_close(got[2], want, atol=1e-5, rtol=1e-5)
    with slots.batch([0, 0], tokens_per_row=len(PROMPT)):  # no row has weights: bit-identical to the base
        assert torch.equal(logits(model, PROMPT), logits(base, PROMPT))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_slots(adapters: dict[str, Path], dtype: torch.dtype) -> None:
    reference = logits(peft_model(tiny_model(), adapters["x"]), PROMPT)
    model = tiny_model(dtype)
    slots = LoraSlots(model, 2, 16, ALL, device="cpu", dtype=dtype)
    slots.load(2, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["x"]))
    assert slots.layers["model.layers.0.self_attn.q_proj"].A_slots.dtype == dtype
    with slots.batch([2, 0], tokens_per_row=len(PROMPT)), torch.inference_mode():
        out = model(input_ids=torch.tensor([PROMPT, PROMPT])).logits.float()
    # Rounding makes elementwise checks flaky; the relative error must be small next to the adapter's effect.
    effect = (reference - logits(tiny_model(), PROMPT)).norm()
    assert (out[0] - reference).norm() < 0.1 * effect


def test_rejects_bad_loads_and_batches(adapters: dict[str, Path], tmp_path: Path) -> None:
    base = tiny_model()
    model = copy.deepcopy(base)
    slots = LoraSlots(model, 2, 8, ("q_proj", "v_proj"), device="cpu", dtype=torch.float32)
    assert type(model.lm_head) is torch.nn.Linear  # only the decoder layers are wrapped
    with pytest.raises(ValueError, match="exceeds max_rank"):
        slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["x"]))  # rank 16 > 8
    assert slots.is_empty(1)
    wide = make_adapter(base, tmp_path / "wide", seed=4, r=4, targets=("q_proj", "up_proj"))
    with pytest.raises(ValueError, match="unknown module"):
        slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=wide))
    assert slots.is_empty(1)  # all-or-nothing
    with pytest.raises(ValueError, match="out of range"):
        slots.load(0, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["y"]))
    with pytest.raises(ValueError, match="out of range"):
        slots.set_plan(TokenPlan(decode_slots=(0, 3)))
    slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["y"]))
    with slots.batch([1]), pytest.raises(RuntimeError, match="in use"):
        slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["y"]))
    assert slots.current_plan is None
    with pytest.raises(ValueError, match="already has LoRA slots"):
        LoraSlots(model, 2, 8, ("q_proj",), device="cpu", dtype=torch.float32)


def test_rejects_unsupported_adapter_configs(adapters: dict[str, Path]) -> None:
    files = {p.name: p.read_bytes() for p in adapters["y"].iterdir()}
    files["adapter_config.json"] = b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}'
    with pytest.raises(ValueError, match="use_dora"):
        read_adapter_files(max_scale=MAX_SCALE, files=files)
    files["adapter_config.json"] = b'{"peft_type": "LORA", "r": 3, "lora_alpha": 4}'
    with pytest.raises(ValueError, match="rank"):
        read_adapter_files(max_scale=MAX_SCALE, files=files)
    with pytest.raises(ValueError, match="missing"):
        read_adapter_files(max_scale=MAX_SCALE, files={"adapter_config.json": b"{}"})


def test_slots_follow_the_model_to_another_dtype(adapters: dict[str, Path]) -> None:
    """model.to() replaces the slot buffers: cached views and plans must not keep writing to the old ones."""
    base = tiny_model()
    model = copy.deepcopy(base)
    slots = LoraSlots(model, 1, 16, ALL, device="cpu", dtype=torch.float32)
    slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["x"]))
    slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["y"]))
    with slots.batch([1]):
        logits(model, PROMPT)
    model.to(torch.float64)
    slots.load(1, read_adapter_dir(max_scale=MAX_SCALE, directory=adapters["x"]))
    with slots.batch([1]):
        got = logits(model, PROMPT)
    assert slots.layers["model.layers.0.mlp.up_proj"].A_slots.dtype == torch.float64
    torch.testing.assert_close(got, logits(peft_model(base, adapters["x"]), PROMPT), atol=1e-4, rtol=1e-4)


def _one_module(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> Any:
    from service.adapters.peft_format import AdapterWeights, LoraModuleWeights

    return AdapterWeights(int(a.shape[0]), {"model.layers.0.self_attn.q_proj": LoraModuleWeights(a, b, scaling)})


def test_an_overflowing_adapter_cannot_touch_another_tenants_decode_row() -> None:
    # Finite weights (what upload validation checks) whose x @ A overflows to inf: the decode gather computes
    # every row against every adapter of the step, and zeroing the foreign blocks by multiplying made inf * 0
    # = NaN in the OTHER tenant's row.
    model = copy.deepcopy(tiny_model())
    slots = LoraSlots(model, 2, 8, ALL, device="cpu", dtype=torch.float32)
    layer = slots.layers["model.layers.0.self_attn.q_proj"]
    d_in, d_out = layer.in_features, layer.out_features
    torch.manual_seed(0)
    slots.load(1, _one_module(torch.randn(2, d_in) * 0.1, torch.randn(d_out, 2) * 0.1))
    slots.load(2, _one_module(torch.full((2, d_in), 3e38), torch.full((d_out, 2), 1e-3)))
    x = torch.ones(2, d_in)
    with torch.inference_mode():
        slots.set_plan(TokenPlan(decode_slots=(1,)))
        alone = layer(x[:1]).clone()
        slots.set_plan(TokenPlan(decode_slots=(1, 2)))
        together = layer(x)
        slots.set_plan(None)
    torch.testing.assert_close(together[0], alone[0])
    assert not torch.isfinite(together[1]).all()  # the overflowing adapter's own row: it alone fails


def test_weights_that_overflow_the_slot_dtype_are_refused_before_anything_is_written() -> None:
    model = copy.deepcopy(tiny_model())
    slots = LoraSlots(model, 1, 8, ALL, device="cpu", dtype=torch.float16)
    layer = slots.layers["model.layers.0.self_attn.q_proj"]
    d_in, d_out = layer.in_features, layer.out_features
    before = layer.B_slots.clone()
    for bad in (
        _one_module(torch.full((2, d_in), 1e5), torch.ones(d_out, 2)),
        _one_module(torch.ones(2, d_in), torch.ones(d_out, 2), scaling=1e5),
    ):
        with pytest.raises(ValueError, match="overflow"):
            slots.load(1, bad)
    assert torch.equal(layer.B_slots, before)
    slots.load(1, _one_module(torch.ones(2, d_in), torch.ones(d_out, 2), scaling=2.0))  # in range: loads
