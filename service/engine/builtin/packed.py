"""The builtin engine's Linears with their weights reordered once into oneDNN's blocked layout (CPU).

A plain CPU matmul reorders its weight into the kernel's layout on every call. An engine step reads each of
the model's ~200 weights once, with few rows (a decode step has one token per row), so that reorder is a large
part of the step: on a 2-vCPU AVX512-BF16 EPYC a (16 x 576) x (576 x 1536) bf16 matmul took 229-296 us from the
plain weight and 128-178 us from the packed one, the (16 x 576) x (576 x 49152) vocab projection 6.4-9.4 vs
3.3-5.4 ms; on a 2-vCPU AVX2-only EPYC in fp32 453-638 vs 320-414 us and 20.6-28.4 vs 9.3-12.5 ms, a 16-row
decode step 124-180 vs 109-113 ms (bench/engine_step.py). In bf16 the engine's step logits are bit-identical
(checked at 3 to 272 tokens); in fp32 the packed kernel sums in another order (differences ~1e-4).

Owns the packed copies and keeping them equal to the weights (`refresh` after an in-place change, such as the
shared LoRA's merge); knows nothing of adapters, rows or settings. Packing is chosen where its kernels were
measured to pay (above): fp32 on x86 CPUs with AVX2 or more, bf16 on CPUs with native bf16 matmul (AMX or
AVX512-BF16; elsewhere oneDNN has no bf16 kernel and the engine serves fp32 anyway). The packed copies take the
weights' memory a second time (the plain weights stay: merges and the trainer's references read them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from service.inference.cpu import CpuInfo, cpu_info

# The row count oneDNN tunes the packed layout for: a decode step's order of magnitude (1 and 256 measured the
# same or worse at 1, 16 and 272 rows).
ROWS_HINT = 16


def can_pack(device: torch.device, dtype: torch.dtype, cpu: CpuInfo | None = None) -> bool:
    """Packing pays here: oneDNN on an x86 CPU with AVX2 or more in fp32, or with native bf16 matmul in bf16."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    onednn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if not onednn or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    info = cpu or cpu_info()
    return info.avx2 if dtype == torch.float32 else info.native_bf16 is not None


class _PackedForward:
    """A Linear's forward from its packed weight (installed as the module's `forward`)."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.weight = torch.empty(0)
        self.repack()

    def repack(self) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(self.linear.weight.detach(), ROWS_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        bias = self.linear.bias.detach() if self.linear.bias is not None else None
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(flat, self.weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


class PackedLinears:
    """Every nn.Linear of a model (the decoder's and the vocab projection) on packed weights, for inference
    only: the packed op has no backward."""

    def __init__(self, model: nn.Module) -> None:
        self._forwards: list[_PackedForward] = []
        with torch.inference_mode():
            for module in model.modules():
                if type(module) is nn.Linear:
                    packed = _PackedForward(module)
                    module.forward = packed  # type: ignore[method-assign,assignment]
                    self._forwards.append(packed)

    def __len__(self) -> int:
        return len(self._forwards)

    def refresh(self, linears: Iterable[nn.Linear] | None = None) -> None:
        """Re-pack the weights of `linears` (all: None) after they changed in place."""
        wanted = None if linears is None else {id(m) for m in linears}
        with torch.inference_mode():
            for packed in self._forwards:
                if wanted is None or id(packed.linear) in wanted:
                    packed.repack()
