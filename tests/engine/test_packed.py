"""engine/builtin/packed.py: packing is chosen only where it pays (fp32 on x86 with AVX2 or more, bf16 where native);
packed Linears give the plain ones' outputs (bf16 bit for bit, fp32 to rounding); their packed copies follow an
in-place weight change only through `refresh` (the engine calls it after the shared LoRA's merge)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from service.engine.builtin.packed import PackedLinears, can_pack
from service.inference.cpu import CpuInfo, cpu_info
from tests.models import tiny_model

CPU = torch.device("cpu")
AMX = CpuInfo("amx box", amx_bf16=True, avx512_bf16=True, avx2=True)
AVX512_BF16 = CpuInfo("avx512-bf16 box", amx_bf16=False, avx512_bf16=True, avx2=True)
AVX2 = CpuInfo("avx2 box", amx_bf16=False, avx512_bf16=False, avx2=True)
NO_AVX2 = CpuInfo("arm or old x86 box", amx_bf16=False, avx512_bf16=False, avx2=False)


def test_packing_is_chosen_in_fp32_from_avx2_and_in_bf16_only_where_bf16_is_native() -> None:
    for cpu in (AMX, AVX512_BF16):
        assert can_pack(CPU, torch.bfloat16, cpu) and can_pack(CPU, torch.float32, cpu)
    assert can_pack(CPU, torch.float32, AVX2) and not can_pack(CPU, torch.bfloat16, AVX2)
    assert not can_pack(CPU, torch.float32, NO_AVX2) and not can_pack(CPU, torch.bfloat16, NO_AVX2)
    assert not can_pack(CPU, torch.float16, AVX512_BF16)
    assert not can_pack(torch.device("cuda"), torch.bfloat16, AMX)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=ids).logits
        return out.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_give_the_plain_outputs_and_follow_a_refresh(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and cpu_info().native_bf16 is None:
        # oneDNN's bf16 kernels need AVX512: on this CPU packing is never chosen in bf16 (fp32 still runs here).
        assert not can_pack(CPU, dtype)
        return
    plain = tiny_model(dtype)
    model = copy.deepcopy(plain)
    packed = PackedLinears(model)
    assert len(packed) == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))

    def same() -> bool:
        got, want = _logits(model, ids), _logits(plain, ids)
        return torch.equal(got, want) if dtype == torch.bfloat16 else torch.allclose(got, want, atol=1e-4, rtol=0)

    assert same()
    with torch.no_grad():  # an in-place change, as a merge makes it
        for m in (model, plain):
            proj = m.model.layers[0].self_attn.q_proj
            proj.weight.add_(torch.ones_like(proj.weight))
    assert not same()  # the packed copy still holds the old weight
    packed.refresh()
    assert same()
