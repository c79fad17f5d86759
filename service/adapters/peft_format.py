"""The PEFT LoRA format, in one place: file names, the tensor-key grammar, the features we do not serve,
rank/alpha patterns (compiled once), the scale rule (incl. rslora), parsing files into `AdapterWeights`,
writing a config or a normalized adapter, the rank concatenation of several LoRAs into one, and the one
merge of a LoRA delta into a base weight (serving and training).

Pure format knowledge: nothing of users, the store, validation limits or the serving state.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file as save_safetensors_file
from torch import nn

from service.engine.types import FileOpener
from service.sealing.cipher import MAGIC, is_sealed_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME})
# `base_model.model.<module path>.lora_A.weight` (save_pretrained) or `....lora_A.<adapter name>.weight`.
TENSOR_KEY = re.compile(
    r"base_model\.model\.(?P<path>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[A-Za-z0-9_-]+))?\.weight"
)
# rank_pattern / alpha_pattern keys: PEFT treats them as regexes; we accept only these characters (no
# quantifiers or groups), so matching stays linear and a key cannot be a regex bomb.
PATTERN_KEY = re.compile(r"[A-Za-z0-9_.]{1,256}")
# Config features that change the forward pass in ways the serving LoRA path does not implement.
UNSUPPORTED_FEATURES = (
    "modules_to_save", "use_dora", "lora_bias", "fan_in_fan_out", "layer_replication",
    "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
    "arrow_config", "kasa_config", "monteclora_config", "velora_config", "megatron_config",
)  # fmt: skip

V = TypeVar("V")


class AdapterFormatError(ValueError):
    """The files are not a LoRA adapter we can serve (the message says why)."""


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling of B @ A: alpha / r, or alpha / sqrt(r) with use_rslora."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class PatternTable(Generic[V]):
    """rank_pattern / alpha_pattern: the first key matching a dotted suffix of a module path wins (PEFT's
    get_pattern_key). Each key is compiled once, not once per module lookup."""

    def __init__(self, patterns: Mapping[str, V]) -> None:
        for key in patterns:
            if not PATTERN_KEY.fullmatch(key):
                raise AdapterFormatError(f"pattern key {key!r} must be a plain module name")
        self._rules = [(re.compile(rf"(.*\.)?({key})$"), value) for key, value in patterns.items()]

    def __len__(self) -> int:
        return len(self._rules)

    def get(self, path: str, default: V) -> V:
        return next((value for rule, value in self._rules if rule.match(path)), default)


@dataclass(frozen=True)
class LoraModuleWeights:
    a: torch.Tensor  # (r, d_in): PEFT lora_A layout
    b: torch.Tensor  # (d_out, r): PEFT lora_B layout
    scaling: float  # lora_scale(...): applied to b @ a

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """scaling * B @ A, (d_out, d_in), in float32."""
        return (self.b.float() @ self.a.float()) * self.scaling


@dataclass(frozen=True)
class AdapterWeights:
    rank: int  # max rank over modules
    modules: Mapping[str, LoraModuleWeights]  # full module path in the base model, e.g. model.layers.3.mlp.up_proj

    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def target_modules(self) -> frozenset[str]:
        return frozenset(path.rsplit(".", 1)[-1] for path in self.modules)


def module_paths(tensor_keys: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Groups tensors by module path: {path: {"A": ..., "B": ...}}; AdapterFormatError on a foreign key."""
    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensor_keys.items():
        match = TENSOR_KEY.fullmatch(key)
        if match is None:
            raise AdapterFormatError(f"unexpected tensor {key!r} (want base_model.model.<module>.lora_A/B.weight)")
        modules.setdefault(match["path"], {})[match["ab"]] = value
    return modules


def check_features(config: Mapping[str, Any]) -> list[str]:
    """Problems with the config's adapter type and options (empty: servable)."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    on = [k for k in UNSUPPORTED_FEATURES if config.get(k)]
    if on:
        problems.append(f"unsupported LoRA features enabled: {on}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config.get('bias')!r} not supported (only 'none')")
    return problems


def parse_peft(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, max_scale: float) -> AdapterWeights:
    """Pairs lora_A/lora_B per module with PEFT's per-module rank and scaling. Refuses a scale above
    `max_scale` and weights that are not finite once scaled: such an adapter would only produce NaN."""
    problems = check_features(config)
    if problems:
        raise AdapterFormatError("; ".join(problems))
    halves = module_paths(tensors)
    if not halves:
        raise AdapterFormatError("adapter has no LoRA tensors")
    base_r = int(config.get("r", 8))
    base_alpha = float(config.get("lora_alpha", base_r))
    ranks = PatternTable[int](config.get("rank_pattern") or {})
    alphas = PatternTable[float](config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModuleWeights] = {}
    for path, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"module {path!r} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"module {path!r}: bad shapes A {tuple(a.shape)}, B {tuple(b.shape)}")
        r = int(ranks.get(path, base_r))
        if r != a.shape[0] or r < 1:
            raise AdapterFormatError(f"module {path!r}: config rank {r} but tensors have rank {a.shape[0]}")
        scaling = lora_scale(float(alphas.get(path, base_alpha)), r, rslora)
        if not math.isfinite(scaling) or not 0 < scaling <= max_scale:
            raise AdapterFormatError(f"module {path!r}: LoRA scale {scaling:g} outside (0, {max_scale:g}]")
        if not (_finite_scaled(a, 1.0) and _finite_scaled(b, scaling)):
            raise AdapterFormatError(f"module {path!r}: weights contain NaN or Inf (scaled by {scaling:g})")
        modules[path] = LoraModuleWeights(a, b, scaling)
    return AdapterWeights(max(m.rank for m in modules.values()), modules)


_FP32_MAX = torch.finfo(torch.float32).max


def _finite_scaled(t: torch.Tensor, scaling: float) -> bool:
    """Every element of `t` times `scaling` is a finite fp32 number. One reduction and no copy (the minimum and
    maximum carry any NaN or Inf): ~18x faster than isfinite over a scaled copy, most of a cold load's checks."""
    if t.numel() == 0:
        return True
    low, high = (float(x) for x in torch.aminmax(t))
    return math.isfinite(low) and math.isfinite(high) and max(-low, high) * scaling <= _FP32_MAX


def _config_object(data: bytes | str) -> dict[str, Any]:
    config = json.loads(data)
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} is not a JSON object")
    return config


def file_purpose(name: str) -> str:
    """What a sealed adapter file is bound to besides its owner: its role."""
    return f"adapter-file/{name}"


def read_adapter_dir(directory: Path, *, max_scale: float, seal: FileOpener | None = None) -> AdapterWeights:
    """Reads the PEFT pair (never a pickle) from a folder; sealed files (service.sealing) through `seal`, the
    owner's, plaintext ones as they are."""
    config = _config_object(_file_bytes(directory, CONFIG_NAME, seal).decode("utf-8"))
    # One open file for the look at its first bytes and the read: a `seal-existing` that replaces the plaintext
    # file meanwhile leaves this load on the file it looked at.
    with open(directory / WEIGHTS_NAME, "rb") as fh:
        if is_sealed_file(fh.read(len(MAGIC))):
            memory = _opener(seal, WEIGHTS_NAME).open_path(file_purpose(WEIGHTS_NAME), fh, _tensor_memory)
        else:
            memory = _mapped(fh)
    return parse_peft(config, tensors_in(torch.from_numpy(memory)), max_scale=max_scale)


def _mapped(fh: Any) -> Any:
    """A plaintext file's bytes as a private writable mapping of its pages (copy on write; nothing is written):
    the tensors are views of the page cache, as safetensors' own load_file makes them."""
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        raise AdapterFormatError("weights file too short")
    memory = mmap.mmap(fh.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(memory, dtype=torch.uint8).numpy()  # the view keeps the mapping alive


_FRESH_MEMORY = 32 * 1024 * 1024  # glibc's largest mmap threshold: smaller blocks are reused from its heap


def _tensor_memory(n: int) -> Any:
    """n bytes for a sealed file's plaintext (the decryption writes into it, the tensors are views of it and keep
    it alive). Up to 32 MiB: torch's allocator, whose freed blocks glibc hands out again (no fresh pages). Above
    that every allocation is fresh memory mapped for it, so it is asked for on transparent huge pages where the
    kernel offers them: the first touch of 70 MB then costs ~4 ms instead of ~18 ms on 4 KiB pages, which was
    most of what a sealed cold load added over a plaintext one (whose tensors map the page cache)."""
    if n <= _FRESH_MEMORY or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(n, dtype=torch.uint8).numpy()
    memory = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8).numpy()  # the view keeps the mapping alive


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def tensors_in(buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer` (uint8), as views of it (no copy): the cold load of a
    sealed adapter decrypts into one buffer and reads its tensors in place. Only float dtypes (a LoRA's); every
    offset and size is checked against the header and the buffer (AdapterFormatError otherwise); a tensor at
    an offset its dtype cannot view is copied out."""
    size = buffer.numel()
    if size < 8:
        raise AdapterFormatError("weights file too short")
    header_len = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
    if header_len > size - 8 or header_len > 100 * 1024 * 1024:
        raise AdapterFormatError("weights header out of bounds")
    try:
        header = json.loads(buffer[8 : 8 + header_len].numpy().tobytes())
    except ValueError as exc:
        raise AdapterFormatError(f"weights header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError("weights header is not a JSON object")
    base, out = 8 + header_len, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(str(info.get("dtype"))) if isinstance(info, dict) else None
        if dtype is None:
            raise AdapterFormatError(f"tensor {name!r}: unsupported dtype")
        try:
            shape, (start, end) = [int(d) for d in info["shape"]], [int(o) for o in info["data_offsets"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"tensor {name!r}: shape or data_offsets malformed") from exc
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= start <= end <= size - base or end - start != numel * dtype.itemsize:
            raise AdapterFormatError(f"tensor {name!r}: offsets out of bounds")
        raw = buffer[base + start : base + end]
        if (base + start) % dtype.itemsize:
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _file_bytes(directory: Path, name: str, seal: FileOpener | None) -> bytes:
    with open(directory / name, "rb") as fh:  # one open file (see read_adapter_dir)
        if is_sealed_file(fh.read(len(MAGIC))):
            return bytes(_opener(seal, name).open_path(file_purpose(name), fh))
        fh.seek(0)
        return fh.read()


def _opener(seal: FileOpener | None, name: str) -> FileOpener:
    if seal is None:
        raise AdapterFormatError(f"{name} is sealed and its owner's key was not given")
    return seal


def read_adapter_files(files: Mapping[str, bytes], *, max_scale: float) -> AdapterWeights:
    """Same as read_adapter_dir, from in-memory file contents keyed by file name."""
    missing = PEFT_FILES - set(files)
    if missing:
        raise AdapterFormatError(f"adapter files missing: {sorted(missing)}")
    config = _config_object(files[CONFIG_NAME].decode("utf-8"))
    return parse_peft(config, load_safetensors_bytes(files[WEIGHTS_NAME]), max_scale=max_scale)


def make_peft_config(
    rank: int,
    alpha: float,
    target_modules: tuple[str, ...] | list[str],
    base_model_name: str | None,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """A valid adapter_config.json (PEFT LoraConfig fields) for code that writes adapters."""
    if rank < 1 or not alpha > 0 or not target_modules:
        raise ValueError("need rank >= 1, alpha > 0 and at least one target module")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def base_linear(model: nn.Module, path: str) -> nn.Linear:
    """The plain Linear at a LoRA module path, through a serving slot wrapper (.base) or PEFT's (.base_layer)."""
    base = model.get_submodule(path)
    for wrapper_attr in ("base", "base_layer"):
        if isinstance(getattr(base, wrapper_attr, None), nn.Module):
            base = getattr(base, wrapper_attr)
    if not isinstance(base, nn.Linear):
        raise AdapterFormatError(f"{path!r} is not a Linear layer")
    return base


@torch.no_grad()
def merge_lora(model: nn.Module, weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """THE merge: W += scaling * B @ A for every module, in place (the Parameter objects stay the same
    tensors). Returns copies of the touched weights as they were, to undo it exactly (`unmerge`)."""
    originals: dict[str, torch.Tensor] = {}
    try:
        for path, m in weights.modules.items():
            weight = base_linear(model, path).weight
            original = weight.detach().clone()
            weight.add_(m.delta().to(device=weight.device, dtype=weight.dtype))
            originals[path] = original
    except BaseException:
        unmerge(model, originals)  # half merged is worse than not at all: the model is shared by every training
        raise
    return originals


@torch.no_grad()
def unmerge(model: nn.Module, originals: Mapping[str, torch.Tensor]) -> None:
    for path, original in originals.items():
        base_linear(model, path).weight.copy_(original)


def concat_lora(parts: Sequence[AdapterWeights]) -> AdapterWeights:
    """Several LoRAs as ONE whose delta is their sum: per module A = [A_1; A_2; ...], B = [s_1 B_1, s_2 B_2, ...]
    (each scale folded into its B, so the result has scaling 1), every module zero-padded to the same rank.
    W + s_1 B_1 A_1 + s_2 B_2 A_2 = W + [s_1 B_1, s_2 B_2] [A_1; A_2]. Serves base + shared + user LoRA on
    engines that take one adapter per row (vLLM)."""
    paths = sorted({path for part in parts for path in part.modules})
    if not paths:
        raise AdapterFormatError("nothing to concatenate")
    rank = max(sum(p.modules[path].rank for p in parts if path in p.modules) for path in paths)
    modules: dict[str, LoraModuleWeights] = {}
    for path in paths:
        own = [p.modules[path] for p in parts if path in p.modules]
        d_in, d_out = int(own[0].a.shape[1]), int(own[0].b.shape[0])
        a = torch.zeros(rank, d_in, dtype=torch.float32)
        b = torch.zeros(d_out, rank, dtype=torch.float32)
        at = 0
        for m in own:
            a[at : at + m.rank] = m.a.float()
            b[:, at : at + m.rank] = m.b.float() * m.scaling
            at += m.rank
        modules[path] = LoraModuleWeights(a, b, 1.0)
    return AdapterWeights(rank, modules)


def save_adapter_dir(weights: AdapterWeights, directory: Path, base_model_name: str | None) -> None:
    """Write `weights` as a plain PEFT pair: one rank for every module (weights.rank; modules of lower rank
    zero-padded) and each module's scale folded into B, so lora_alpha = r and no patterns are needed."""
    r = weights.rank
    tensors: dict[str, torch.Tensor] = {}
    for path, m in weights.modules.items():
        a = torch.zeros(r, m.a.shape[1], dtype=torch.float32)
        b = torch.zeros(m.b.shape[0], r, dtype=torch.float32)
        a[: m.rank] = m.a.float()
        b[:, : m.rank] = m.b.float() * m.scaling
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
    config = make_peft_config(r, float(r), sorted(weights.target_modules()), base_model_name)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors_file(tensors, str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
