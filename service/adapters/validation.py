"""Validation of uploaded/trained PEFT LoRA files BEFORE anything is loaded into the model.

Owns the base-model spec (Linear shapes, fingerprint) and every rule an adapter must pass; never
unpickles (safetensors header is parsed by hand first). Knows nothing of users, storage or serving.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as st_load

from service.config import Settings

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME})
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}
_LAYER_RE = re.compile(r"(^|\.)layers\.\d+\.")
_TENSOR_RE = re.compile(
    r"base_model\.model\.(?P<path>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[A-Za-z0-9_-]+))?\.weight"
)
_PLAIN_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATTERN_KEY_RE = re.compile(r"[A-Za-z0-9_.]{1,256}")  # no quantifiers/groups: safe to use as PEFT does
# Config features that change the forward pass in ways the serving LoRA path does not implement.
_UNSUPPORTED_FEATURES = (
    "modules_to_save", "use_dora", "lora_bias", "fan_in_fan_out", "layer_replication",
    "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
    "arrow_config", "kasa_config", "monteclora_config", "velora_config", "megatron_config",
)  # fmt: skip


class AdapterValidationError(ValueError):
    """Every problem found in one adapter, listed together."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid adapter: " + "; ".join(self.problems))


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the served base model's Linear shapes in its decoder layers."""

    model_type: str
    base_model_name: str
    fingerprint: str
    linear_shapes: Mapping[str, tuple[int, int]] = field(hash=False, repr=False)

    @staticmethod
    def compute_fingerprint(model_type: str, linear_shapes: Mapping[str, tuple[int, int]]) -> str:
        rows = sorted((path, d_in, d_out) for path, (d_in, d_out) in linear_shapes.items())
        return hashlib.sha256(json.dumps([model_type, rows]).encode()).hexdigest()

    @classmethod
    def from_model(cls, model: torch.nn.Module, name: str) -> BaseModelSpec:
        """Build from an HF causal LM, BEFORE any LoRA layers are injected into it."""
        model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "unknown")
        shapes: dict[str, tuple[int, int]] = {}
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and _LAYER_RE.search(path):
                path = path.removesuffix(".base_layer")  # tolerate an already-wrapped PEFT model
                shapes[path] = (int(module.in_features), int(module.out_features))
        fingerprint = cls.compute_fingerprint(model_type, shapes)
        return cls(model_type, name, fingerprint, MappingProxyType(dict(sorted(shapes.items()))))


@dataclass(frozen=True)
class ValidationLimits:
    max_file_bytes: int
    max_tensors: int
    max_rank: int
    allowed_target_modules: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> ValidationLimits:
        return cls(
            max_file_bytes=settings.adapter_max_file_bytes,
            max_tensors=settings.adapter_max_tensors,
            max_rank=settings.adapter_max_rank,
            allowed_target_modules=tuple(settings.adapter_target_modules),
        )


@dataclass(frozen=True)
class ValidatedAdapter:
    """A checked adapter. module_ranks/module_scales: per module path (rank_pattern/alpha_pattern applied;
    scale = alpha / r)."""

    config: dict[str, Any] = field(hash=False)
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    sha256: str
    n_tensors: int
    nbytes: int
    module_ranks: Mapping[str, int] = field(default_factory=dict, hash=False)
    module_scales: Mapping[str, float] = field(default_factory=dict, hash=False)


@dataclass
class _Lora:
    """What the config says, with None where the config was invalid (so tensor checks still run)."""

    r: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_for(self, path: str) -> int | None:
        key = _pattern_key(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, path: str) -> float | None:
        key = _pattern_key(self.alpha_pattern, path)
        return self.alpha_pattern[key] if key is not None else self.alpha


def _pattern_key(patterns: Mapping[str, object], path: str) -> str | None:
    # Same rule as peft.utils.other.get_pattern_key (keys are restricted to safe characters).
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)


def _positive(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def _rank(v: object, max_rank: int) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= max_rank else None


def _name_matches(declared: str, served: str) -> bool:
    def norm(s: str) -> str:
        return s.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].casefold().removesuffix(".gguf")

    a, b = norm(declared), norm(served)
    short, long = sorted((a, b), key=len)
    return a == b or (bool(short) and long.startswith(short) and long[len(short)] in "-._")


def _is_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or bool(re.match(r"[A-Za-z]:[\\/]", name))


def _parse_config(data: bytes | None, problems: list[str]) -> dict[str, Any] | None:
    if data is None:
        return None
    if len(data) > MAX_CONFIG_BYTES:
        problems.append(f"{CONFIG_NAME} is {len(data)} bytes (max {MAX_CONFIG_BYTES})")
        return None

    def no_constants(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    try:
        cfg = json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        problems.append(f"{CONFIG_NAME} is not valid JSON: {e}")
        return None
    if not isinstance(cfg, dict):
        problems.append(f"{CONFIG_NAME} must be a JSON object")
        return None
    return cfg


def _check_targets(raw: object, limits: ValidationLimits, problems: list[str]) -> tuple[str, ...]:
    if isinstance(raw, str):
        if not _PLAIN_NAME_RE.fullmatch(raw):
            problems.append(f"target_modules regex {raw!r} is not allowed; list module names")
            return ()
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        problems.append("target_modules must be a non-empty list of module names")
        return ()
    bad = sorted({t for t in raw if t not in limits.allowed_target_modules})
    if bad:
        problems.append(f"target_modules {bad} not allowed (allowed: {list(limits.allowed_target_modules)})")
    return tuple(sorted({t for t in raw if t in limits.allowed_target_modules}))


def _check_patterns(cfg: Mapping[str, Any], lora: _Lora, limits: ValidationLimits, problems: list[str]) -> None:
    dests: tuple[tuple[str, Callable[[object], float | None], dict[str, Any]], ...] = (
        ("rank_pattern", lambda v: _rank(v, limits.max_rank), lora.rank_pattern),
        ("alpha_pattern", _positive, lora.alpha_pattern),
    )
    for key, parse, dest in dests:
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or len(pattern) > limits.max_tensors:
            problems.append(f"{key} must be an object with at most {limits.max_tensors} entries")
            continue
        for k, v in pattern.items():
            if not _PATTERN_KEY_RE.fullmatch(k):
                problems.append(f"{key} key {k!r} must be a plain module name")
            elif (value := parse(v)) is None:
                problems.append(f"{key}[{k!r}] = {v!r} invalid (ranks 1..{limits.max_rank}, alphas > 0)")
            else:
                dest[k] = value


def _check_config(cfg: Mapping[str, Any], spec: BaseModelSpec, limits: ValidationLimits, problems: list[str]) -> _Lora:
    lora = _Lora()
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type must be 'CAUSAL_LM', got {cfg.get('task_type')!r}")
    lora.r = _rank(cfg.get("r"), limits.max_rank)
    if lora.r is None:
        problems.append(f"rank r={cfg.get('r')!r} must be an integer in 1..{limits.max_rank}")
    lora.alpha = _positive(cfg.get("lora_alpha"))
    if lora.alpha is None:
        problems.append(f"lora_alpha={cfg.get('lora_alpha')!r} must be a number > 0")
    lora.targets = _check_targets(cfg.get("target_modules"), limits, problems)
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} not supported (only 'none')")
    on = [k for k in _UNSUPPORTED_FEATURES if cfg.get(k)]
    if on:
        problems.append(f"unsupported LoRA features enabled: {on}")
    _check_patterns(cfg, lora, limits, problems)
    name = cfg.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        problems.append("base_model_name_or_path must be a string or null")
    elif name and not _is_local_path(name) and not _name_matches(name, spec.base_model_name):
        problems.append(f"adapter was trained for {name!r}, this server serves {spec.base_model_name!r}")
    return lora


def _check_header(data: bytes, limits: ValidationLimits, problems: list[str]) -> bool:
    """Parse the safetensors header by hand, so pickles/truncations fail clearly before any loader."""
    hint = " (looks like a zip/torch.save file)" if data[:4] == b"PK\x03\x04" else ""
    hint = " (looks like a pickle)" if data[:1] == b"\x80" else hint
    if len(data) < 8:
        problems.append(f"{WEIGHTS_NAME} is truncated ({len(data)} bytes)")
        return False
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        problems.append(f"{WEIGHTS_NAME} is not a safetensors file: header length {n} too big{hint}")
        return False
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        problems.append(f"{WEIGHTS_NAME} is not a valid safetensors file: header is not JSON{hint}")
        return False
    if not isinstance(header, dict):
        problems.append(f"{WEIGHTS_NAME}: safetensors header must be a JSON object")
        return False
    header.pop("__metadata__", None)
    if len(header) > limits.max_tensors:
        problems.append(f"{WEIGHTS_NAME} has {len(header)} tensors (max {limits.max_tensors})")
        return False
    return _check_entries(header, len(data) - 8 - n, problems)


def _span(shape: object, offs: object, itemsize: int, body: int) -> tuple[int, int] | None:
    """(begin, end) of a tensor's bytes if its header entry is consistent and inside the file."""
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return None
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
        return None
    begin, end = int(offs[0]), int(offs[1])
    ok = 0 <= begin <= end <= body and end - begin == math.prod(shape) * itemsize
    return (begin, end) if ok else None


def _check_entries(header: Mapping[str, Any], body: int, problems: list[str]) -> bool:
    spans: list[tuple[int, int]] = []
    ok = True
    for name, e in header.items():
        shape, offs = (e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (None, None)
        dtype = e.get("dtype") if isinstance(e, dict) else None
        if dtype not in _DTYPE_SIZES:
            problems.append(f"tensor {name!r}: dtype {dtype!r} not allowed (F32, F16, BF16)")
            ok = False
            continue
        span = _span(shape, offs, _DTYPE_SIZES[dtype], body)
        if span is None:
            problems.append(f"tensor {name!r}: shape/data_offsets inconsistent or outside the file")
            ok = False
            continue
        spans.append(span)
    ends = [0, *(x for span in sorted(spans) for x in span), body]
    if ok and any(ends[i] != ends[i + 1] for i in range(0, len(ends), 2)):
        problems.append(f"{WEIGHTS_NAME}: tensor data overlaps or leaves gaps")
        ok = False
    return ok


def _load_tensors(data: bytes | None, limits: ValidationLimits, problems: list[str]) -> dict[str, torch.Tensor] | None:
    if data is None:
        return None
    if len(data) > limits.max_file_bytes:
        problems.append(f"{WEIGHTS_NAME} is {len(data)} bytes (max {limits.max_file_bytes})")
        return None
    if not _check_header(data, limits, problems):
        return None
    try:
        tensors: dict[str, torch.Tensor] = st_load(bytes(data))
    except Exception as e:  # safetensors raises its own error types
        problems.append(f"{WEIGHTS_NAME} could not be read: {e}")
        return None
    if not tensors:
        problems.append(f"{WEIGHTS_NAME} contains no LoRA tensors")
    return tensors


def _group_tensors(tensors: Mapping[str, torch.Tensor], problems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    names: set[str | None] = set()
    for key, t in tensors.items():
        m = _TENSOR_RE.fullmatch(key)
        if m is None:
            problems.append(f"unexpected tensor {key!r} (want base_model.model.<module>.lora_A/B.weight)")
            continue
        names.add(m["name"])
        modules.setdefault(m["path"], {})[m["ab"]] = t
    if len(names) > 1:
        problems.append(f"tensors mix several adapter names: {sorted(str(n) for n in names)}")
    return modules


def _check_module(
    path: str, ab: Mapping[str, torch.Tensor], spec: BaseModelSpec, lora: _Lora, problems: list[str]
) -> int | None:
    shape = spec.linear_shapes.get(path)
    if shape is None:
        problems.append(f"module {path!r} is not a Linear layer of {spec.base_model_name}")
        return None
    leaf = path.rsplit(".", 1)[-1]
    if leaf not in lora.targets:
        problems.append(f"module {path!r}: {leaf!r} is not an allowed target module of this adapter")
    if "A" not in ab or "B" not in ab:
        problems.append(f"module {path!r}: lora_A and lora_B must both be present")
        return None
    a, b = ab["A"], ab["B"]
    d_in, d_out = shape
    r = lora.rank_for(path) or (a.shape[0] if a.dim() == 2 else -1)
    if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
        problems.append(
            f"module {path!r}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the base model "
            f"(want A({r}, {d_in}) B({d_out}, {r})); wrong architecture or rank?"
        )
        return None
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        problems.append(f"module {path!r}: weights contain NaN or Inf")
    return r


def _check_tensors(
    tensors: Mapping[str, torch.Tensor], spec: BaseModelSpec, lora: _Lora, problems: list[str]
) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for path, ab in sorted(_group_tensors(tensors, problems).items()):
        r = _check_module(path, ab, spec, lora, problems)
        if r is not None:
            ranks[path] = r
    return ranks


def validate_peft_files(files: Mapping[str, bytes], spec: BaseModelSpec, limits: ValidationLimits) -> ValidatedAdapter:
    """Check every rule; raise AdapterValidationError listing ALL problems, else describe the adapter."""
    problems: list[str] = []
    extra, missing = set(files) - _PEFT_FILES, _PEFT_FILES - set(files)
    if extra or missing:
        problems.append(f"need exactly the PEFT pair: missing {sorted(missing)}, extra {sorted(extra)}")
    cfg = _parse_config(files.get(CONFIG_NAME), problems)
    lora = _check_config(cfg, spec, limits, problems) if cfg is not None else _Lora()
    weights = files.get(WEIGHTS_NAME)
    tensors = _load_tensors(weights, limits, problems)
    ranks = _check_tensors(tensors, spec, lora, problems) if tensors else {}
    if problems or cfg is None or weights is None or tensors is None or lora.r is None or lora.alpha is None:
        raise AdapterValidationError(problems or ["adapter is incomplete"])
    scales = {p: (lora.alpha_for(p) or lora.alpha) / r for p, r in ranks.items()}
    return ValidatedAdapter(
        config=cfg,
        rank=lora.r,
        alpha=lora.alpha,
        target_modules=lora.targets,
        sha256=hashlib.sha256(weights).hexdigest(),
        n_tensors=len(tensors),
        nbytes=len(weights),
        module_ranks=MappingProxyType(ranks),
        module_scales=MappingProxyType(scales),
    )


def make_peft_config(
    rank: int,
    alpha: float,
    target_modules: tuple[str, ...] | list[str],
    base_model_name: str | None,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """A valid adapter_config.json (PEFT LoraConfig fields) for code that writes adapters."""
    if _rank(rank, 1 << 16) is None or _positive(alpha) is None or not target_modules:
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
