"""The reliability suite (issue 6): schema fuzzing, hostile ids and archive names. Shared helper: a valid
random PEFT LoRA built with torch directly (no PEFT model needed), also used by bench/soak.py."""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors.torch import save

from service.adapters.archive import pack_zip
from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, make_peft_config


def random_lora_zip(
    linear_shapes: Mapping[str, tuple[int, int]],
    base_model_name: str | None,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.1,
) -> bytes:
    """A valid random PEFT LoRA (zip upload) for a base model with these Linear shapes (path -> d_in, d_out),
    e.g. ``BaseModelSpec.linear_shapes``; base_model_name None skips the server's base-name check."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, (d_in, d_out) in sorted(linear_shapes.items()):
        if path.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * scale
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * scale
    config = make_peft_config(rank, 2.0 * rank, targets, base_model_name)
    return pack_zip({CONFIG_NAME: json.dumps(config).encode(), WEIGHTS_NAME: save(tensors)})
