"""What the processor under this process can do, and the compute dtype that follows from it.

Owns capability detection (torch's own cpuinfo, the check oneDNN relies on: by flag, never by CPU name) and
the ONE dtype rule that serving (`loader.load_model`) and training (`trainer.autocast_dtype`) both apply.
Knows nothing of models, settings objects or HTTP.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CpuInfo:
    """The flags that decide the dtype (and that every bench JSON records)."""

    model: str  # for records only: the choice never reads it
    amx_bf16: bool  # AMX tiles with bf16 (Sapphire Rapids and later): ~7x fp32 matmul
    avx512_bf16: bool  # AVX512-BF16 dot products (Cooper Lake, Zen 4): ~2x fp32
    avx2: bool  # bf16 is emulated here: ~80x slower than fp32 measured on such a box

    def flags(self) -> dict[str, bool]:
        return {"amx_bf16": self.amx_bf16, "avx512_bf16": self.avx512_bf16, "avx2": self.avx2}

    @property
    def native_bf16(self) -> str | None:
        """The flag that makes bf16 matmul native here, or None."""
        return "amx_bf16" if self.amx_bf16 else "avx512_bf16" if self.avx512_bf16 else None


def _model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU, detected once. AMX also needs the OS to grant the tile state, which torch's
    `_is_amx_tile_supported` asks for; a flag the kernel withholds must not pick bf16."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    amx_os = torch.cpu._is_amx_tile_supported() if hasattr(torch.cpu, "_is_amx_tile_supported") else True
    avx512_bf16 = (
        bool(caps.get("avx512_bf16"))
        if caps
        else hasattr(torch.cpu, "_is_avx512_bf16_supported") and torch.cpu._is_avx512_bf16_supported()
    )
    return CpuInfo(
        model=_model_name(),
        amx_bf16=bool(caps.get("amx_bf16")) and amx_os,
        avx512_bf16=avx512_bf16,
        avx2=bool(caps.get("avx2")) if caps else torch.cpu._is_avx2_supported(),
    )


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # why, for /readyz and the start-up log: "cpu has amx_bf16", "OPPU_DTYPE=float32", ...

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_dtype(
    setting: str, device: torch.device, *, cpu: CpuInfo | None = None, cuda_bf16: bool | None = None
) -> DtypeChoice:
    """OPPU_DTYPE -> the weights' dtype. "auto": CUDA bf16 where supported (else fp16); a CPU with native
    bf16 matmul (AMX or AVX512-BF16) bf16; any other CPU fp32. `cpu`/`cuda_bf16` override detection (tests)."""
    if setting != "auto":
        return DtypeChoice(DTYPES[setting], f"OPPU_DTYPE={setting}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return DtypeChoice(torch.bfloat16, "cuda has bf16") if bf16 else DtypeChoice(torch.float16, "cuda: no bf16")
    flag = (cpu or cpu_info()).native_bf16
    if flag is not None:
        return DtypeChoice(torch.bfloat16, f"cpu has {flag}")
    return DtypeChoice(torch.float32, "cpu has no native bf16 matmul (neither amx_bf16 nor avx512_bf16)")
