"""BatchGenerator: a mixed batch of 8 adapters + base equals PEFT row by row; stops, sampling, cancel."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from service.adapters.peft_format import read_adapter_dir
from service.adapters.slots import LoraSlots
from service.inference.engine import BatchGenerator, GenOutput, GenRow, SamplingParams
from tests.adapters.test_slots import ALL, logits, make_adapter, peft_model, tiny_model

MAX_SCALE = 256.0  # the default OPPU_ADAPTER_MAX_SCALE

EOS = 2
NEW = 12
# (rank, target modules, rslora): ranks among {2, 4, 8, 16}, differing module subsets.
SPECS: list[tuple[int, tuple[str, ...], bool]] = [
    (2, ("q_proj", "v_proj"), False),
    (4, ("q_proj", "k_proj", "v_proj", "o_proj"), True),
    (8, ("gate_proj", "up_proj", "down_proj"), False),
    (16, ALL, False),
    (2, ("o_proj", "down_proj"), True),
    (4, ("k_proj", "up_proj"), False),
    (8, ("q_proj", "v_proj", "gate_proj"), False),
    (16, ALL, True),
]
SLOT_OF = [3, 1, 8, 2, 5, 7, 4, 6]  # adapter k sits in slot SLOT_OF[k]: not in row order


def prompt(k: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + k)
    return torch.randint(3, 512, (3 + k,), generator=g).tolist()  # lengths 3..11: real left padding


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[Path], Any, LoraSlots]:
    base, root = tiny_model(), tmp_path_factory.mktemp("engine")
    dirs = [
        make_adapter(base, root / f"a{k}", seed=10 + k, r=r, targets=t, rslora=rs) for k, (r, t, rs) in enumerate(SPECS)
    ]
    model = copy.deepcopy(base)
    slots = LoraSlots(model, 8, 16, ALL, device="cpu", dtype=torch.float32)
    for k, d in enumerate(dirs):
        slots.load(SLOT_OF[k], read_adapter_dir(max_scale=MAX_SCALE, directory=d))
    return base, dirs, model, slots


def greedy(k: int, slot: int, new: int = NEW) -> GenRow:
    return GenRow(prompt(k), SamplingParams(new, stop_token_ids=frozenset({EOS})), slot)


def reference(model: Any, ids: list[int]) -> tuple[list[int], bool]:
    """(tokens without the eos, stopped on eos) from transformers' own greedy generate."""
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=EOS)
    toks: list[int] = out[0, len(ids) :].tolist()
    stopped = bool(toks) and toks[-1] == EOS
    return (toks[:-1] if stopped else toks), stopped


def check_row(ref_model: Any, ids: list[int], got: GenOutput) -> None:
    toks, stopped = reference(ref_model, ids)
    assert got.token_ids == toks
    assert got.finish_reason == ("stop" if stopped else "length")
    assert got.step_logits is not None
    full = logits(ref_model, ids + got.token_ids)
    assert len(got.step_logits) == len(toks) + stopped
    for t, step in enumerate(got.step_logits):
        assert torch.allclose(step, full[len(ids) - 1 + t], atol=1e-4, rtol=1e-4), f"step {t}"


def test_mixed_batch_matches_peft_per_row(setup: tuple[Any, list[Path], Any, LoraSlots]) -> None:
    base, dirs, model, slots = setup
    rows = [greedy(k, SLOT_OF[k]) for k in range(8)] + [greedy(8, 0)]
    outs = BatchGenerator(model, slots=slots, pad_token_id=EOS, device="cpu").generate(rows, return_logits=True)
    for k, d in enumerate(dirs):
        check_row(peft_model(base, d), rows[k].input_ids, outs[k])
    check_row(base, rows[8].input_ids, outs[8])
    # Every adapter visibly changes its row (so the comparison above can fail): same prompts on slot 0.
    plain = BatchGenerator(model, slots=slots, pad_token_id=EOS, device="cpu").generate(
        [GenRow(r.input_ids, r.params, 0) for r in rows[:8]]
    )
    assert all(p.token_ids != o.token_ids for p, o in zip(plain, outs, strict=False))


@pytest.mark.parametrize("drop", [True, False])
def test_early_finishing_row_does_not_change_others(setup: tuple[Any, list[Path], Any, LoraSlots], drop: bool) -> None:
    _, _, model, slots = setup
    gen = BatchGenerator(model, slots=slots, pad_token_id=EOS, device="cpu", drop_finished=drop)
    full = gen.generate([greedy(0, 3), greedy(1, 0), greedy(2, 8)], return_logits=True)
    short = gen.generate([greedy(0, 3), greedy(1, 0, new=2), greedy(2, 8)], return_logits=True)
    assert short[1].token_ids == full[1].token_ids[:2]
    assert short[1].finish_reason == "length"
    for i in (0, 2):
        assert short[i].token_ids == full[i].token_ids
        got, want = short[i].step_logits, full[i].step_logits
        assert got is not None and want is not None
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_per_row(setup: tuple[Any, list[Path], Any, LoraSlots]) -> None:
    _, _, model, slots = setup
    gen = BatchGenerator(model, slots=slots, pad_token_id=EOS, device="cpu")
    sampled = GenRow(prompt(4), SamplingParams(16, temperature=1.0, top_p=0.9, seed=7), 5)
    alone = gen.generate([sampled])[0].token_ids
    crowd = [greedy(9, 1), GenRow(prompt(2), SamplingParams(16, temperature=0.7, seed=1), 2), sampled]
    assert gen.generate(crowd)[2].token_ids == alone
    reseeded = GenRow(sampled.input_ids, SamplingParams(16, temperature=1.0, top_p=0.9, seed=8), 5)
    assert gen.generate([reseeded])[0].token_ids != alone
    assert len(alone) == 16 and alone != gen.generate([greedy(4, 5, new=16)])[0].token_ids


def test_stop_cancel_and_streaming(setup: tuple[Any, list[Path], Any, LoraSlots]) -> None:
    _, _, model, slots = setup
    gen = BatchGenerator(model, slots=slots, pad_token_id=EOS, device="cpu")
    free = gen.generate([greedy(0, 3), greedy(1, 1)])
    stop_at = free[1].token_ids[3]
    assert stop_at not in free[1].token_ids[:3]
    stopping = GenRow(prompt(1), SamplingParams(NEW, stop_token_ids=frozenset({stop_at})), 1)
    seen: list[tuple[int, int]] = []

    def on_token(row: int, token: int) -> bool:
        seen.append((row, token))
        return not (row == 0 and sum(r == 0 for r, _ in seen) == 3)

    outs = gen.generate([greedy(0, 3), stopping, GenRow(prompt(2), SamplingParams(0), 0)], on_token=on_token)
    assert (outs[0].token_ids, outs[0].finish_reason) == (free[0].token_ids[:3], "cancelled")
    assert (outs[1].token_ids, outs[1].finish_reason) == (free[1].token_ids[:3], "stop")
    assert (outs[2].token_ids, outs[2].finish_reason) == ([], "length")
    assert [t for r, t in seen if r == 1] == outs[1].token_ids  # streamed in order, stop token not emitted
    assert outs[0].step_logits is None


def test_rejects_bad_rows(setup: tuple[Any, list[Path], Any, LoraSlots]) -> None:
    base, _, model, slots = setup
    with pytest.raises(ValueError, match="out of range"):
        BatchGenerator(model, slots=slots, pad_token_id=EOS, device="cpu").generate([greedy(0, 9)])
    with pytest.raises(ValueError, match="out of range"):
        BatchGenerator(base, slots=None, pad_token_id=EOS, device="cpu").generate([greedy(0, 1)])
    with pytest.raises(ValueError, match="empty prompt"):
        BatchGenerator(base, slots=None, pad_token_id=EOS, device="cpu").generate([GenRow([], SamplingParams(4))])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(4, top_p=0.0)
    assert slots.current_batch is None
