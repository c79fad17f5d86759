"""Validation of uploaded/trained PEFT LoRA files BEFORE anything is loaded into the model.

Owns the base-model spec (Linear shapes, fingerprint) and every rule an adapter must pass; the format
itself (names, key grammar, patterns, scale) is `peft_format`'s. Never unpickles (the safetensors header is
parsed by hand first). Returns the parsed weights it checked. Knows nothing of users, storage or serving.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as st_load

from service.adapters.peft_format import (
    CONFIG_NAME,
    PEFT_FILES,
    TENSOR_KEY,
    WEIGHTS_NAME,
    AdapterFormatError,
    AdapterWeights,
    PatternTable,
    check_features,
    parse_peft,
)
from service.adapters.slots import fits_slot
from service.config import SHARED_LORA_RANK, Settings

MAX_CONFIG_BYTES = 1024 * 1024
# The safetensors header's cap, from the tensors an adapter may have. A real LoRA's header is one ~130-byte entry
# per tensor ("base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [8, 576],
# "data_offsets": [0, 18432]}) and PEFT's {"format": "pt"}: ~55 KB for the default model's 420 tensors. 512 B a
# tensor leaves room for tensor names of 400 characters, 64 KiB for a tool's metadata. json builds what the header
# holds before anything can look at it: a 16 MiB header of `{},` (a ~98 KB zip) was 5 M dicts, ~13 s of CPU and
# 1.1 GB before its 422; at the default 4096 tensors (2.1 MiB) the worst is ~50 MB and under a second.
HEADER_BYTES_PER_TENSOR = 512
HEADER_METADATA_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024  # whatever OPPU_ADAPTER_MAX_TENSORS says
MAX_JSON_DEPTH = 16  # a PEFT config nests 3 levels, a safetensors header 3: deeper is never a real adapter
# What a 422 lists: the first problems, then how many more (4096 bad tensor names made a 32 MB answer); a name
# or value from the upload is shown up to MAX_SHOWN_CHARS, any one problem up to MAX_PROBLEM_CHARS.
MAX_PROBLEMS_SHOWN = 20
MAX_SHOWN_CHARS = 200
MAX_PROBLEM_CHARS = 1000
_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}
_LAYER_RE = re.compile(r"(^|\.)layers\.\d+\.")
_PLAIN_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(value: object) -> str:
    """A name or value from the upload, as a message shows it: its repr, cut to MAX_SHOWN_CHARS."""
    return _clip(repr(value), MAX_SHOWN_CHARS)


class AdapterValidationError(ValueError):
    """Every problem found in one adapter (each cut to MAX_PROBLEM_CHARS); the message lists the first
    MAX_PROBLEMS_SHOWN (`shown`)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = [_clip(p, MAX_PROBLEM_CHARS) for p in problems]
        super().__init__("invalid adapter: " + "; ".join(self.shown))

    @property
    def shown(self) -> list[str]:
        """The problems an answer lists: at most MAX_PROBLEMS_SHOWN, then "and N more"."""
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        return self.problems if more <= 0 else [*self.problems[:MAX_PROBLEMS_SHOWN], f"and {more} more"]


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the served base model's Linear shapes in its decoder layers, and the dtype its
    weights are served in (a LoRA's scaled weights must stay finite in it: slots.fits_slot)."""

    model_type: str
    base_model_name: str
    fingerprint: str
    linear_shapes: Mapping[str, tuple[int, int]] = field(hash=False, repr=False)
    dtype: torch.dtype = torch.float32

    @staticmethod
    def compute_fingerprint(model_type: str, linear_shapes: Mapping[str, tuple[int, int]]) -> str:
        rows = sorted((path, d_in, d_out) for path, (d_in, d_out) in linear_shapes.items())
        return hashlib.sha256(json.dumps([model_type, rows]).encode()).hexdigest()

    @classmethod
    def from_model(cls, model: torch.nn.Module, name: str) -> BaseModelSpec:
        """Build from an HF causal LM, BEFORE any LoRA layers are injected into it."""
        model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "unknown")
        shapes: dict[str, tuple[int, int]] = {}
        dtypes: set[torch.dtype] = set()
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and _LAYER_RE.search(path):
                path = path.removesuffix(".base_layer")  # tolerate an already-wrapped PEFT model
                shapes[path] = (int(module.in_features), int(module.out_features))
                dtypes.add(module.weight.dtype)
        fingerprint = cls.compute_fingerprint(model_type, shapes)
        # the slots are made in the model's dtype (composition.builtin_engine; vLLM's LoRAs too)
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        return cls(model_type, name, fingerprint, MappingProxyType(dict(sorted(shapes.items()))), dtype)


@dataclass(frozen=True)
class ValidationLimits:
    max_file_bytes: int
    max_tensors: int
    max_rank: int
    allowed_target_modules: tuple[str, ...]
    max_scale: float = 256.0  # per-module LoRA scale (alpha / r): larger only overflows to inf
    # A user's adapter's largest rank, where lower than max_rank: vLLM serves it and the shared task LoRA as ONE
    # LoRA of their summed rank, at most OPPU_VLLM_MAX_LORA_RANK (engine/vllm/loras.py); a user adapter of a
    # higher rank would pass here and never be served. None: max_rank (the builtin engine adds them apart).
    max_user_rank: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ValidationLimits:
        shared_room = settings.vllm_max_lora_rank - SHARED_LORA_RANK  # >= train_user_rank: Settings checks it
        return cls(
            max_file_bytes=settings.adapter_max_file_bytes,
            max_tensors=settings.adapter_max_tensors,
            max_rank=settings.adapter_max_rank,
            allowed_target_modules=tuple(settings.adapter_target_modules),
            max_scale=settings.adapter_max_scale,
            max_user_rank=min(settings.adapter_max_rank, shared_room) if settings.engine == "vllm" else None,
        )

    def for_user(self) -> ValidationLimits:
        """The limits a user's adapter must pass (the shared task LoRA's: `self`)."""
        return self if self.max_user_rank is None else replace(self, max_rank=self.max_user_rank)

    @property
    def header_cap(self) -> int:
        """The largest safetensors header accepted (see HEADER_BYTES_PER_TENSOR)."""
        return min(MAX_HEADER_BYTES, self.max_tensors * HEADER_BYTES_PER_TENSOR + HEADER_METADATA_BYTES)


@dataclass(frozen=True)
class ValidatedAdapter:
    """A checked adapter and the weights parsed from it (what serving loads into a slot)."""

    config: dict[str, Any] = field(hash=False)
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    sha256: str
    n_tensors: int
    nbytes: int
    weights: AdapterWeights = field(hash=False, repr=False)

    @property
    def module_ranks(self) -> Mapping[str, int]:
        return MappingProxyType({p: m.rank for p, m in self.weights.modules.items()})

    @property
    def module_scales(self) -> Mapping[str, float]:
        """Per module path, with rank_pattern / alpha_pattern / use_rslora applied."""
        return MappingProxyType({p: m.scaling for p, m in self.weights.modules.items()})


@dataclass
class _Lora:
    """What the config says, with None where the config was invalid (so tensor checks still run)."""

    r: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] = ()
    ranks: PatternTable[int] = field(default_factory=lambda: PatternTable[int]({}))

    def rank_for(self, path: str) -> int | None:
        return self.ranks.get(path, self.r) if self.r is not None else None


def _positive(v: object) -> float | None:
    """A finite number > 0 as a float, else None (never OverflowError: JSON ints have no size limit)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        number = float(v)
    except OverflowError:  # an integer beyond float's range, such as 10**400
        return None
    return number if math.isfinite(number) and number > 0 else None


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


_TOO_DEEP = f"nested more than {MAX_JSON_DEPTH} levels deep"


def _too_deep(value: object) -> bool:
    """Whether parsed JSON nests deeper than MAX_JSON_DEPTH: walked without recursion (a recursive walk is what
    must not happen), containers only, stopping at the first one too deep."""
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if level > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        todo.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return False


def _parse_json(text: str, **kwargs: Any) -> Any:
    """json.loads that refuses deep nesting with a ValueError: json raises RecursionError (a 500) at about
    1000 levels."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None


def _loads(text: str, **kwargs: Any) -> Any:
    """_parse_json, and deep but parseable nesting refused too (later code may walk what it returned)."""
    value = _parse_json(text, **kwargs)
    if isinstance(value, dict | list) and _too_deep(value):
        raise ValueError(_TOO_DEEP)
    return value


def _parse_config(data: bytes | None, problems: list[str]) -> dict[str, Any] | None:
    if data is None:
        return None
    if len(data) > MAX_CONFIG_BYTES:
        problems.append(f"{CONFIG_NAME} is {len(data)} bytes (max {MAX_CONFIG_BYTES})")
        return None

    def no_constants(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    try:
        cfg = _loads(data.decode("utf-8"), parse_constant=no_constants)
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
            problems.append(f"target_modules regex {_shown(raw)} is not allowed; list module names")
            return ()
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        problems.append("target_modules must be a non-empty list of module names")
        return ()
    bad = sorted({t for t in raw if t not in limits.allowed_target_modules})
    if bad:
        problems.append(f"target_modules {_shown(bad)} not allowed (allowed: {list(limits.allowed_target_modules)})")
    return tuple(sorted({t for t in raw if t in limits.allowed_target_modules}))


def _pattern_cap(spec: BaseModelSpec, limits: ValidationLimits) -> int:
    """A pattern table needs no more entries than there are modules it could address."""
    return sum(1 for path in spec.linear_shapes if path.rsplit(".", 1)[-1] in limits.allowed_target_modules)


def _check_pattern(
    cfg: Mapping[str, Any], key: str, parse: Callable[[object], Any], want: str, cap: int, problems: list[str]
) -> dict[str, Any]:
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict) or len(pattern) > cap:
        problems.append(f"{key} must be an object with at most {cap} entries (one per adaptable module)")
        return {}
    out: dict[str, Any] = {}
    for k, v in pattern.items():
        if (value := parse(v)) is None:
            problems.append(f"{key}[{_shown(k)}] = {_shown(v)} invalid: want {want}")
        else:
            out[k] = value
    try:
        PatternTable(out)  # the key grammar is peft_format's
    except AdapterFormatError as exc:
        problems.append(f"{key}: {exc}")
        return {}
    return out


def _check_config(cfg: Mapping[str, Any], spec: BaseModelSpec, limits: ValidationLimits, problems: list[str]) -> _Lora:
    lora = _Lora()
    problems.extend(check_features(cfg))
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type must be 'CAUSAL_LM', got {_shown(cfg.get('task_type'))}")
    lora.r = _rank(cfg.get("r"), limits.max_rank)
    if lora.r is None:
        problems.append(f"rank r={_shown(cfg.get('r'))} must be an integer in 1..{limits.max_rank}")
    lora.alpha = _positive(cfg.get("lora_alpha"))
    if lora.alpha is None:
        problems.append(f"lora_alpha={_shown(cfg.get('lora_alpha'))} must be a number > 0")
    lora.targets = _check_targets(cfg.get("target_modules"), limits, problems)
    cap = _pattern_cap(spec, limits)
    ranks = _check_pattern(
        cfg, "rank_pattern", lambda v: _rank(v, limits.max_rank), f"a rank in 1..{limits.max_rank}", cap, problems
    )
    lora.ranks = PatternTable(ranks)
    _check_pattern(cfg, "alpha_pattern", _positive, "an alpha > 0", cap, problems)
    name = cfg.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        problems.append("base_model_name_or_path must be a string or null")
    elif name and not _is_local_path(name) and not _name_matches(name, spec.base_model_name):
        problems.append(f"adapter was trained for {_shown(name)}, this server serves {spec.base_model_name!r}")
    return lora


def _check_header(data: bytes, limits: ValidationLimits, problems: list[str]) -> bool:
    """Parse the safetensors header by hand, so pickles/truncations fail clearly before any loader. Its size is
    capped before it is parsed, its layout checked before anything walks it."""
    hint = " (looks like a zip/torch.save file)" if data[:4] == b"PK\x03\x04" else ""
    hint = " (looks like a pickle)" if data[:1] == b"\x80" else hint
    if len(data) < 8:
        problems.append(f"{WEIGHTS_NAME} is truncated ({len(data)} bytes)")
        return False
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        problems.append(f"{WEIGHTS_NAME} is not a safetensors file: header length {n} too big{hint}")
        return False
    if n > limits.header_cap:
        problems.append(
            f"{WEIGHTS_NAME}: safetensors header of {n} bytes is above the cap of {limits.header_cap} "
            f"({HEADER_BYTES_PER_TENSOR} bytes per tensor, at most {limits.max_tensors} tensors)"
        )
        return False
    header = _parse_header(data[8 : 8 + n], hint, problems)
    if header is None:
        return False
    header.pop("__metadata__", None)
    if len(header) > limits.max_tensors:
        problems.append(f"{WEIGHTS_NAME} has {len(header)} tensors (max {limits.max_tensors})")
        return False
    return _check_entries(header, len(data) - 8 - n, problems)


def _parse_header(raw: bytes, hint: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        header = _parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        why = str(e) if str(e) == _TOO_DEEP else "is not JSON"
        problems.append(f"{WEIGHTS_NAME} is not a valid safetensors file: header {why}{hint}")
        return None
    layout = _header_layout_problem(header)
    if layout is not None:
        problems.append(f"{WEIGHTS_NAME}: safetensors header {layout}")
        return None
    if _too_deep(header):  # an entry's keys beyond dtype, shape and data_offsets
        problems.append(f"{WEIGHTS_NAME} is not a valid safetensors file: header {_TOO_DEEP}")
        return None
    assert isinstance(header, dict)
    return header


def _header_layout_problem(header: object) -> str | None:
    """The cheap check before any walk: an object of tensor entries, each an object, and an optional
    __metadata__ object of strings. Stops at the first entry that is not."""
    if not isinstance(header, dict):
        return "must be a JSON object (tensor name -> entry)"
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return "__metadata__ must be an object of strings"
        elif not isinstance(entry, dict):
            return f"entry {_shown(name)} must be an object (dtype, shape, data_offsets)"
    return None


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
            problems.append(f"tensor {_shown(name)}: dtype {_shown(dtype)} not allowed (F32, F16, BF16)")
            ok = False
            continue
        span = _span(shape, offs, _DTYPE_SIZES[dtype], body)
        if span is None:
            problems.append(f"tensor {_shown(name)}: shape/data_offsets inconsistent or outside the file")
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
        m = TENSOR_KEY.fullmatch(key)
        if m is None:
            problems.append(f"unexpected tensor {_shown(key)} (want base_model.model.<module>.lora_A/B.weight)")
            continue
        names.add(m["name"])
        modules.setdefault(m["path"], {})[m["ab"]] = t
    if len(names) > 1:
        problems.append(f"tensors mix several adapter names: {_shown(sorted(str(n) for n in names))}")
    return modules


def _check_module(
    path: str, ab: Mapping[str, torch.Tensor], spec: BaseModelSpec, lora: _Lora, problems: list[str]
) -> int | None:
    shape = spec.linear_shapes.get(path)
    if shape is None:
        problems.append(f"module {_shown(path)} is not a Linear layer of {spec.base_model_name}")
        return None
    leaf = path.rsplit(".", 1)[-1]
    if leaf not in lora.targets:
        problems.append(f"module {_shown(path)}: {_shown(leaf)} is not an allowed target module of this adapter")
    if "A" not in ab or "B" not in ab:
        problems.append(f"module {_shown(path)}: lora_A and lora_B must both be present")
        return None
    a, b = ab["A"], ab["B"]
    d_in, d_out = shape
    r = lora.rank_for(path) or (a.shape[0] if a.dim() == 2 else -1)
    if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
        problems.append(
            f"module {_shown(path)}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the base model "
            f"(want A({r}, {d_in}) B({d_out}, {r})); wrong architecture or rank?"
        )
        return None
    return r


def _check_tensors(tensors: Mapping[str, torch.Tensor], spec: BaseModelSpec, lora: _Lora, problems: list[str]) -> None:
    for path, ab in sorted(_group_tensors(tensors, problems).items()):
        _check_module(path, ab, spec, lora, problems)


def _parsed(
    cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], spec: BaseModelSpec, limits: ValidationLimits
) -> AdapterWeights:
    """The weights as serving will hold them: numeric rules (scale cap, finite once scaled) are checked here,
    and the slots' own rule (finite in the dtype served, with its margin): one that fails it would be accepted
    and then refused by every load (503 adapter_unavailable on every request)."""
    try:
        weights = parse_peft(cfg, tensors, max_scale=limits.max_scale)
    except AdapterFormatError as exc:
        raise AdapterValidationError([str(exc)]) from exc
    problems = [
        f"module {_shown(path)}: weights scaled by {m.scaling:g} overflow {spec.dtype}, the dtype this server serves in"
        for path, m in weights.modules.items()
        if not fits_slot(m, spec.dtype)
    ]
    if problems:
        raise AdapterValidationError(problems)
    return weights


def validate_peft_files(files: Mapping[str, bytes], spec: BaseModelSpec, limits: ValidationLimits) -> ValidatedAdapter:
    """Check every rule; raise AdapterValidationError listing ALL problems, else the adapter and its weights."""
    problems: list[str] = []
    extra, missing = set(files) - PEFT_FILES, PEFT_FILES - set(files)
    if extra or missing:
        problems.append(f"need exactly the PEFT pair: missing {sorted(missing)}, extra {sorted(extra)}")
    cfg = _parse_config(files.get(CONFIG_NAME), problems)
    lora = _check_config(cfg, spec, limits, problems) if cfg is not None else _Lora()
    data = files.get(WEIGHTS_NAME)
    tensors = _load_tensors(data, limits, problems)
    if tensors:
        _check_tensors(tensors, spec, lora, problems)
    if problems or cfg is None or data is None or tensors is None or lora.r is None or lora.alpha is None:
        raise AdapterValidationError(problems or ["adapter is incomplete"])
    return ValidatedAdapter(
        config=cfg,
        rank=lora.r,
        alpha=lora.alpha,
        target_modules=lora.targets,
        sha256=hashlib.sha256(data).hexdigest(),
        n_tensors=len(tensors),
        nbytes=len(data),
        weights=_parsed(cfg, tensors, spec, limits),
    )
