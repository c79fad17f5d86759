"""Adapter validation against a tiny random Llama: real PEFT adapters accepted, bad ones refused clearly."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import LlamaConfig, LlamaForCausalLM

from service.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError, make_peft_config, parse_peft
from service.adapters.slots import LoraSlots
from service.adapters.validation import (
    MAX_PROBLEMS_SHOWN,
    MAX_SHOWN_CHARS,
    AdapterValidationError,
    BaseModelSpec,
    ValidationLimits,
    validate_peft_files,
)
from service.config import ALL_TARGET_MODULES, Settings

BASE_NAME = "SmolLM2-135M-Instruct"
LIMITS = ValidationLimits(
    max_file_bytes=64 * 1024 * 1024, max_tensors=4096, max_rank=64, allowed_target_modules=ALL_TARGET_MODULES
)
Files = dict[str, bytes]


def tiny_llama(hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def peft_files(tmp: Path, hidden: int = 64, r: int = 8, targets: Any = ALL_TARGET_MODULES, **kw: Any) -> Files:
    """A real adapter: get_peft_model + save_pretrained, read back as bytes (README.md dropped)."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **kw)
    get_peft_model(tiny_llama(hidden), cfg).save_pretrained(str(tmp))
    return {name: (tmp / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def edit_config(files: Files, **changes: Any) -> Files:
    cfg = json.loads(files[CONFIG_NAME])
    cfg.update(changes)
    return {**files, CONFIG_NAME: json.dumps(cfg).encode()}


def edit_tensors(files: Files, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Files:
    return {**files, WEIGHTS_NAME: st_save(fn(dict(st_load(files[WEIGHTS_NAME]))))}


def problems_of(files: Files, spec: BaseModelSpec, limits: ValidationLimits = LIMITS) -> str:
    with pytest.raises(AdapterValidationError) as exc:
        validate_peft_files(files, spec, limits)
    assert exc.value.problems and all(p in str(exc.value) for p in exc.value.shown)
    return str(exc.value)


@pytest.fixture(scope="module")
def spec() -> BaseModelSpec:
    return BaseModelSpec.from_model(tiny_llama(), BASE_NAME)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return peft_files(tmp_path_factory.mktemp("good"))


def test_spec_from_model(spec: BaseModelSpec) -> None:
    assert spec.model_type == "llama" and spec.base_model_name == BASE_NAME
    assert len(spec.linear_shapes) == 2 * 7
    assert spec.linear_shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert spec.linear_shapes["model.layers.1.self_attn.k_proj"] == (64, 32)
    assert spec.linear_shapes["model.layers.1.mlp.down_proj"] == (128, 64)
    assert "lm_head" not in spec.linear_shapes
    assert spec.fingerprint == BaseModelSpec.from_model(tiny_llama(), "other").fingerprint
    assert spec.fingerprint != BaseModelSpec.from_model(tiny_llama(32), BASE_NAME).fingerprint
    hash(spec)


def test_limits_from_settings() -> None:
    limits = ValidationLimits.from_settings(Settings(adapter_max_rank=16))
    assert limits.max_rank == 16 and limits.allowed_target_modules == ALL_TARGET_MODULES


def test_valid_adapter_accepted(spec: BaseModelSpec, good: Files) -> None:
    v = validate_peft_files(good, spec, LIMITS)
    assert (v.rank, v.alpha, v.target_modules) == (8, 16.0, tuple(sorted(ALL_TARGET_MODULES)))
    assert v.n_tensors == 2 * 7 * 2 and v.nbytes == len(good[WEIGHTS_NAME])
    assert v.config["peft_type"] == "LORA" and len(v.sha256) == 64
    assert set(v.module_ranks) == set(spec.linear_shapes)
    assert set(v.module_scales.values()) == {2.0}


def test_rank4_subset_accepted(spec: BaseModelSpec, tmp_path: Path) -> None:
    v = validate_peft_files(peft_files(tmp_path, r=4, targets=["q_proj", "v_proj"]), spec, LIMITS)
    assert v.rank == 4 and v.target_modules == ("q_proj", "v_proj") and v.n_tensors == 8


def test_rank_and_alpha_pattern(spec: BaseModelSpec, tmp_path: Path) -> None:
    files = peft_files(tmp_path, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32})
    v = validate_peft_files(files, spec, LIMITS)
    assert v.module_ranks["model.layers.0.self_attn.q_proj"] == 4
    assert v.module_scales["model.layers.0.self_attn.q_proj"] == 16 / 4
    assert v.module_scales["model.layers.1.self_attn.v_proj"] == 32 / 8
    assert "rank_pattern['q_proj'] = 128 invalid" in problems_of(edit_config(files, rank_pattern={"q_proj": 128}), spec)
    assert "plain module name" in problems_of(edit_config(files, rank_pattern={"(a+)+$": 4}), spec)


@pytest.mark.parametrize(
    "name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", "/models/anything", None]
)
def test_base_model_name_is_lenient(spec: BaseModelSpec, good: Files, name: str | None) -> None:
    validate_peft_files(edit_config(good, base_model_name_or_path=name), spec, LIMITS)


def test_other_base_model_name_refused(spec: BaseModelSpec, good: Files) -> None:
    msg = problems_of(edit_config(good, base_model_name_or_path="meta-llama/Llama-3.1-8B"), spec)
    assert "trained for 'meta-llama/Llama-3.1-8B'" in msg


def test_adapter_name_in_tensor_keys_accepted(spec: BaseModelSpec, good: Files) -> None:
    def rename(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace(".weight", ".default.weight"): v for k, v in t.items()}

    assert validate_peft_files(edit_tensors(good, rename), spec, LIMITS).n_tensors == 28


@pytest.mark.parametrize(
    ("payload", "hint"),
    [(pickle.dumps({"w": torch.zeros(2).tolist()}), "pickle"), (None, "torch.save")],
)
def test_pickle_renamed_refused(spec: BaseModelSpec, good: Files, payload: bytes | None, hint: str) -> None:
    if payload is None:
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(4)}, buf)
        payload = buf.getvalue()
    msg = problems_of({**good, WEIGHTS_NAME: payload}, spec)
    assert "not a safetensors file" in msg and hint in msg


def test_truncated_refused(spec: BaseModelSpec, good: Files) -> None:
    data = good[WEIGHTS_NAME]
    assert "outside the file" in problems_of({**good, WEIGHTS_NAME: data[: len(data) // 2]}, spec)
    assert "truncated" in problems_of({**good, WEIGHTS_NAME: data[:5]}, spec)
    assert "not a safetensors file" in problems_of({**good, WEIGHTS_NAME: data[:100]}, spec)


def test_bad_dtype_and_too_many_tensors(spec: BaseModelSpec, good: Files) -> None:
    ints = edit_tensors(good, lambda t: {k: v.to(torch.int64) for k, v in t.items()})
    assert "dtype 'I64' not allowed" in problems_of(ints, spec)
    small = ValidationLimits(64 * 1024 * 1024, 4, 64, ALL_TARGET_MODULES)
    assert "28 tensors (max 4)" in problems_of(good, spec, small)
    tiny = ValidationLimits(1000, 4096, 64, ALL_TARGET_MODULES)
    assert "bytes (max 1000)" in problems_of(good, spec, tiny)


def test_nan_weights_refused(spec: BaseModelSpec, good: Files) -> None:
    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")
        return t

    assert "'model.layers.1.mlp.up_proj': weights contain NaN or Inf" in problems_of(edit_tensors(good, poison), spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("half", "value", "alpha", "finite"),
    [
        ("A", float("nan"), 4.0, False),
        ("A", float("inf"), 4.0, False),
        ("B", float("-inf"), 4.0, False),
        ("B", float("nan"), 4.0, False),
        ("B", 3e38, 4.0, True),  # finite at scale 1
        ("B", -3e38, 8.0, False),  # finite, but not once scaled by 2 (fp32 overflows)
        ("A", 3e38, 8.0, True),  # only B is scaled
    ],
)
def test_weights_must_be_finite_once_scaled(
    dtype: torch.dtype, half: str, value: float, alpha: float, finite: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight": torch.randn(*shape, generator=gen)
        for ab, shape in (("A", (4, 16)), ("B", (16, 4)))
    }
    target = tensors[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{half}.weight"]
    target[3, 1] = value
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config = make_peft_config(4, alpha, ("q_proj",), None)
    if finite:
        assert parse_peft(config, tensors, max_scale=256.0).rank == 4
    else:
        with pytest.raises(AdapterFormatError, match="NaN or Inf"):
            parse_peft(config, tensors, max_scale=256.0)


def test_huge_rank_refused(spec: BaseModelSpec, tmp_path: Path) -> None:
    msg = problems_of(peft_files(tmp_path, r=1024, targets=["q_proj"]), spec)
    assert "rank r=1024 must be an integer in 1..64" in msg


def test_rank_mismatch_between_config_and_tensors(spec: BaseModelSpec, good: Files) -> None:
    assert "do not fit" in problems_of(edit_config(good, r=4), spec)


def test_other_architecture_refused(spec: BaseModelSpec, tmp_path: Path) -> None:
    msg = problems_of(peft_files(tmp_path, hidden=32), spec)
    assert "do not fit the base model" in msg and "wrong architecture" in msg


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
# Hostile adapters on the embeddings: PEFT warns while the test builds them, which is the point.
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning")
def test_unknown_target_module_refused(spec: BaseModelSpec, tmp_path: Path, module: str) -> None:
    msg = problems_of(peft_files(tmp_path, targets=["q_proj", module]), spec)
    assert f"target_modules ['{module}'] not allowed" in msg
    assert ("not a Linear layer" in msg) if module == "lm_head" else ("unexpected tensor" in msg)


def test_regex_target_modules_refused(spec: BaseModelSpec, good: Files) -> None:
    assert "regex" in problems_of(edit_config(good, target_modules=r".*\.(q_proj|v_proj)"), spec)
    validate_peft_files(
        edit_tensors(
            edit_config(good, target_modules="q_proj"),
            lambda t: {k: v for k, v in t.items() if "q_proj" in k},
        ),
        spec,
        LIMITS,
    )


def test_many_problems_listed_together(spec: BaseModelSpec, good: Files) -> None:
    bad = edit_config(
        good, peft_type="IA3", r=1024, lora_alpha=-1, use_dora=True, bias="all", modules_to_save=["lm_head"]
    )
    bad = edit_tensors(bad, lambda t: {**t, "base_model.model.model.norm.weight": torch.ones(64)})
    with pytest.raises(AdapterValidationError) as exc:
        validate_peft_files({**bad, "README.md": b"hi"}, spec, LIMITS)
    msg = str(exc.value)
    for needle in ("peft_type", "r=1024", "lora_alpha=-1", "use_dora", "modules_to_save", "bias='all'",
                   "unexpected tensor", "README.md"):  # fmt: skip
        assert needle in msg
    assert len(exc.value.problems) >= 7 and isinstance(exc.value, ValueError)


def test_missing_pair_and_bad_json(spec: BaseModelSpec, good: Files) -> None:
    assert "missing ['adapter_config.json']" in problems_of({WEIGHTS_NAME: good[WEIGHTS_NAME]}, spec)
    assert "not valid JSON" in problems_of({**good, CONFIG_NAME: b"{nope"}, spec)
    assert "JSON object" in problems_of({**good, CONFIG_NAME: b"[1]"}, spec)
    only_a = edit_tensors(good, lambda t: {k: v for k, v in t.items() if "lora_A" in k})
    assert "lora_A and lora_B must both be present" in problems_of(only_a, spec)


def test_overlapping_offsets_refused(spec: BaseModelSpec, good: Files) -> None:
    data = good[WEIGHTS_NAME]
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    a0, a1 = (f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight" for i in (0, 1))
    header[a1]["data_offsets"] = header[a0]["data_offsets"]  # same size: consistent, but overlapping
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    patched = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    assert "overlaps or leaves gaps" in problems_of({**good, WEIGHTS_NAME: patched}, spec)


def test_make_peft_config_round_trip(spec: BaseModelSpec, good: Files, tmp_path: Path) -> None:
    cfg = make_peft_config(
        8, 16, ["v_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], BASE_NAME
    )
    files = {**good, CONFIG_NAME: json.dumps(cfg).encode()}
    assert validate_peft_files(files, spec, LIMITS).rank == 8
    (tmp_path / CONFIG_NAME).write_bytes(files[CONFIG_NAME])
    loaded = LoraConfig.from_pretrained(str(tmp_path))
    assert loaded.r == 8 and set(loaded.target_modules) == set(ALL_TARGET_MODULES)
    with pytest.raises(ValueError):
        make_peft_config(0, 16, ["q_proj"], BASE_NAME)


@pytest.mark.parametrize("depth", [100_000, 40])
def test_deeply_nested_json_is_a_problem_not_a_crash(spec: BaseModelSpec, good: Files, depth: int) -> None:
    """Issue 23 N8: json.loads raises RecursionError (a 500) on deep nesting; deep but parseable nesting is
    refused too, before any later code walks it (in the header: inside a tensor entry, whose layout passes)."""
    nested = "[" * depth + "]" * depth
    cfg = json.loads(good[CONFIG_NAME])
    config = json.dumps(cfg)[:-1].encode() + f', "x": {nested}}}'.encode()
    assert "nested" in problems_of({**good, CONFIG_NAME: config}, spec)
    data = good[WEIGHTS_NAME]
    (n,) = struct.unpack("<Q", data[:8])
    entry = f'{{"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": {nested}}}'
    raw = data[8 : 8 + n].rstrip()[:-1] + f', "x": {entry}}}'.encode()
    assert "nested" in problems_of({**good, WEIGHTS_NAME: with_header(raw, data[8 + n :])}, spec)


def with_header(header: bytes, body: bytes = b"") -> bytes:
    """A safetensors file of this header (padded to 8 bytes, as safetensors writes it) and tensor data."""
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + body


def hostile_header(size: int) -> bytes:
    """The reproduced upload's header: {"__metadata__": ["<~100 KB of noise>", {}, {}, ...]}, `size` bytes. Zipped
    ~98 KB (the noise keeps the member under the archive's compression-ratio cap); parsed, millions of dicts."""
    noise = json.dumps(base64.b64encode(os.urandom(75_000)).decode())
    count = (size - len(noise) - 24) // 3
    return f'{{"__metadata__": [{noise}{",{}" * count}]}}'.encode()


def test_a_header_above_its_cap_is_refused_before_it_is_parsed(spec: BaseModelSpec, good: Files) -> None:
    # 16 MB of `{},` parsed into 5 M dicts and walked: ~13 s of CPU and 1.1 GB before its 422 (an upload slot
    # held all along). The cap comes from the tensors an adapter may have: 512 bytes each + 64 KiB.
    msg = problems_of({**good, WEIGHTS_NAME: with_header(hostile_header(16 * 1024 * 1024))}, spec)
    assert "safetensors header of 16777216 bytes is above the cap of 2162688" in msg
    assert "could not be read" not in msg  # refused on its length: never parsed, never given to safetensors
    small = ValidationLimits(64 * 1024 * 1024, 28, 64, ALL_TARGET_MODULES)
    assert small.header_cap == 28 * 512 + 64 * 1024
    validate_peft_files(good, spec, small)  # a real adapter's header is far below it
    assert "above the cap" in problems_of({**good, WEIGHTS_NAME: with_header(hostile_header(100_000))}, spec, small)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (hostile_header(1024 * 1024), "__metadata__ must be an object of strings"),
        (b'{"__metadata__": {"format": 1}}', "__metadata__ must be an object of strings"),
        (b'{"__metadata__": {"format": ' + b"[" * 40 + b"]" * 40 + b"}}", "__metadata__ must be an object of strings"),
        (b'{"t": [1, 2]}', "entry 't' must be an object"),
        (b'{"t": ' + b"[" * 40 + b"]" * 40 + b"}", "entry 't' must be an object"),
        (b"[{}, {}]", "must be a JSON object"),
    ],
)
def test_a_header_not_laid_out_as_safetensors_is_refused_before_any_walk(
    spec: BaseModelSpec, good: Files, header: bytes, why: str
) -> None:
    """An object of tensor entries (objects) and an optional __metadata__ object of strings: anything else is
    refused by that check, before the nesting walk or safetensors' own parser sees it."""
    msg = problems_of({**good, WEIGHTS_NAME: with_header(header)}, spec)
    assert f"{WEIGHTS_NAME}: safetensors header {why}" in msg
    assert "nested" not in msg and "could not be read" not in msg


@pytest.mark.parametrize(
    "changes",
    [{"lora_alpha": 10**400}, {"alpha_pattern": {"q_proj": 10**400}}, {"lora_alpha": -(10**400)}],
    ids=["lora_alpha", "alpha_pattern", "negative"],
)
def test_an_integer_beyond_floats_range_is_a_problem_not_a_crash(
    spec: BaseModelSpec, good: Files, changes: dict[str, Any]
) -> None:
    # JSON integers have no size limit: float(10**400) raised OverflowError (a 500 on upload).
    msg = problems_of(edit_config(good, **changes), spec)
    assert "must be a number > 0" in msg or "invalid: want an alpha > 0" in msg


def test_a_thousand_problems_are_listed_as_twenty_with_names_cut_short(spec: BaseModelSpec, good: Files) -> None:
    # 4096 tensor names of ~3.9 KB each made a 32 MB 422 (message + details): every problem, every name in full.
    names = [f"n{i}_" + "x" * 1200 for i in range(1000)]
    tensors = {name: torch.zeros(1) for name in names}
    with pytest.raises(AdapterValidationError) as exc:
        validate_peft_files({**good, WEIGHTS_NAME: st_save(tensors)}, spec, LIMITS)
    err = exc.value
    assert len(err.problems) == 1000  # all found (a caller may count them), each cut short
    assert len(err.shown) == MAX_PROBLEMS_SHOWN + 1 and err.shown[-1] == f"and {1000 - MAX_PROBLEMS_SHOWN} more"
    cut = re.fullmatch(r"unexpected tensor ('n\d+_x+)\.\.\. \(120\d characters\) \(want .*\)", err.shown[0])
    assert cut is not None and len(cut[1]) == MAX_SHOWN_CHARS
    assert all(len(p) < MAX_SHOWN_CHARS + 100 for p in err.problems)
    assert str(err) == "invalid adapter: " + "; ".join(err.shown) and len(str(err)) < 8000
    # a long value from the config is cut the same way
    msg = problems_of(edit_config(good, lora_alpha=10**400, task_type="T" * 5000), spec)
    assert "lora_alpha=1000" in msg and "... (401 characters) must be a number > 0" in msg
    assert "(5002 characters)" in msg and "T" * 300 not in msg


def _with_b_value(files: Files, value: float) -> Files:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def poke(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t[key] = t[key].clone()
        t[key][0, 0] = value
        return t

    return edit_tensors(files, poke)


@pytest.mark.parametrize(
    ("dtype", "scaled", "fits"),
    [
        (torch.float32, 3.3e38, True),
        (torch.float32, 3.4e38, False),  # finite in fp32 (what peft_format checks), in the slots' 1% margin
        (torch.bfloat16, 3.3e38, True),
        (torch.bfloat16, 3.38e38, False),
        (torch.float16, 6.0e4, True),
        (torch.float16, 7.0e4, False),  # an ordinary fp32 number, inf in an fp16 slot
    ],
)
def test_weights_must_fit_the_dtype_they_are_served_in(
    spec: BaseModelSpec, good: Files, dtype: torch.dtype, scaled: float, fits: bool
) -> None:
    """One rule with the slots (slots.fits_slot): what validation accepts, a slot of the served dtype loads; what
    a slot would refuse (every request then 503 adapter_unavailable, forever) is refused at upload (422)."""
    served = dataclasses.replace(spec, dtype=dtype)
    files = _with_b_value(good, scaled / 2.0)  # the good adapter's scale: alpha 16 / r 8
    slots = LoraSlots(tiny_llama(), 1, 8, ALL_TARGET_MODULES, device="cpu", dtype=dtype)
    if fits:
        slots.load(1, validate_peft_files(files, served, LIMITS).weights)
    else:
        msg = problems_of(files, served, LIMITS)
        assert f"'model.layers.0.self_attn.q_proj': weights scaled by 2 overflow {dtype}" in msg
        with pytest.raises(ValueError, match="overflow the slot dtype"):
            slots.load(1, parse_peft(json.loads(files[CONFIG_NAME]), st_load(files[WEIGHTS_NAME]), max_scale=256))


def test_the_served_dtype_is_the_models() -> None:
    assert BaseModelSpec.from_model(tiny_llama(), BASE_NAME).dtype == torch.float32
    assert BaseModelSpec.from_model(tiny_llama().to(torch.bfloat16), BASE_NAME).dtype == torch.bfloat16


def test_on_vllm_a_users_rank_leaves_room_for_the_shared_lora() -> None:
    # vLLM serves user + shared as ONE LoRA of their summed rank, at most OPPU_VLLM_MAX_LORA_RANK: a user
    # adapter of a higher rank than it leaves was accepted and never served.
    vllm = ValidationLimits.from_settings(Settings(engine="vllm", vllm_max_lora_rank=16))
    assert (vllm.max_rank, vllm.for_user().max_rank) == (64, 16 - 8)
    small = ValidationLimits.from_settings(Settings(engine="vllm", vllm_max_lora_rank=12, train_user_rank=4))
    assert (small.max_rank, small.for_user().max_rank) == (64, 4)  # the shared LoRA (rank 8) still fits its own
    builtin = ValidationLimits.from_settings(Settings(vllm_max_lora_rank=12))
    assert builtin.for_user() == builtin and builtin.max_rank == 64
