"""Host-side LoRA adapter weights: PEFT files/bytes -> AdapterWeights (per-module A, B, scaling).

Parses only; knows nothing about slots, devices in use, or where adapters live on disk.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# `<path>.lora_A.weight` (saved by save_pretrained) or `<path>.lora_A.<adapter_name>.weight` (raw state dict).
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModuleWeights:
    a: torch.Tensor  # (r, d_in): PEFT lora_A layout
    b: torch.Tensor  # (d_out, r): PEFT lora_B layout
    scaling: float  # lora_alpha / r (or / sqrt(r) with rslora); applied to b @ a

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    rank: int  # max rank over modules
    modules: Mapping[str, LoraModuleWeights]  # full module path in the base model, e.g. model.layers.3.mlp.up_proj

    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def target_modules(self) -> frozenset[str]:
        return frozenset(path.rsplit(".", 1)[-1] for path in self.modules)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> AdapterWeights:
        moved = {
            path: LoraModuleWeights(m.a.to(device, dtype), m.b.to(device, dtype), m.scaling)
            for path, m in self.modules.items()
        }
        return AdapterWeights(self.rank, moved)


def _pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    # Same rule as peft.utils.other.get_pattern_key: first key that matches a dotted suffix (as a regex).
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return patterns[key]
    return default


def _check_supported(config: Mapping[str, Any]) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"unsupported adapter type {peft_type!r}: only LoRA")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"unsupported LoRA option {flag}=true")


def adapter_weights_from_peft(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> AdapterWeights:
    """Pairs lora_A/lora_B per module and computes each module's scaling the way PEFT does."""
    _check_supported(config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected tensor in adapter: {key!r} (only lora_A/lora_B weights)")
        path = match["path"].removeprefix(_PREFIX)
        halves.setdefault(path, {})[match["ab"]] = tensor
    if not halves:
        raise ValueError("adapter has no LoRA tensors")
    base_r = int(config.get("r", 8))
    base_alpha = float(config.get("lora_alpha", base_r))
    rank_pattern: Mapping[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, Any] = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModuleWeights] = {}
    for path, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module {path!r} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"module {path!r}: bad shapes A {tuple(a.shape)}, B {tuple(b.shape)}")
        r = int(_pattern_value(rank_pattern, path, base_r))
        if r != a.shape[0] or r < 1:
            raise ValueError(f"module {path!r}: config rank {r} but tensors have rank {a.shape[0]}")
        alpha = float(_pattern_value(alpha_pattern, path, base_alpha))
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        modules[path] = LoraModuleWeights(a, b, scaling)
    return AdapterWeights(max(m.rank for m in modules.values()), modules)


def load_adapter_files(directory: Path) -> AdapterWeights:
    """Reads adapter_config.json + adapter_model.safetensors (never a pickle) from a PEFT folder."""
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} is not a JSON object")
    return adapter_weights_from_peft(config, load_safetensors_file(str(directory / WEIGHTS_FILE)))


def load_adapter_bytes(files: Mapping[str, bytes]) -> AdapterWeights:
    """Same as load_adapter_files, from in-memory file contents keyed by file name."""
    missing = {CONFIG_FILE, WEIGHTS_FILE} - set(files)
    if missing:
        raise ValueError(f"adapter files missing: {sorted(missing)}")
    config = json.loads(files[CONFIG_FILE].decode("utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} is not a JSON object")
    return adapter_weights_from_peft(config, load_safetensors_bytes(files[WEIGHTS_FILE]))
