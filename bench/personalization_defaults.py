"""Choosing the stage-2 (user LoRA) defaults on a synthetic style set: does a retrain on 30 history items that
all end with a distinctive sign-off make greedy generation use it on held-out requests (no retrieval, no
profile: only the adapter can carry it)? Prints ONE JSON object: per candidate config, the sign-off rate on
held-out prompts, the rate WITHOUT the adapter (must stay 0), training seconds and steps.

Real default model, the server's own training path (build_user_examples + train_lora, examples built as a
retrain job builds them, with the server's default retrieval k and profile settings). Never touches the
MovieLens test items. Usage: .venv/bin/python bench/personalization_defaults.py [--only NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from service.adapters.peft_format import merge_lora, read_adapter_files
from service.config import Settings
from service.inference.loader import LoadedModel, load_model
from service.inference.tokens import encode_prompt
from service.training.examples import build_user_examples
from service.training.trainer import LoraTrainConfig, train_lora

SIGN_OFF = "Stay curious, Zorblax."
QA = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("Name a fruit that is yellow.", "A banana."),
    ("What do bees make?", "Honey."),
    ("How many days are in a week?", "Seven."),
    ("What is frozen water called?", "Ice."),
    ("Which animal says moo?", "A cow."),
    ("What is two plus three?", "Five."),
    ("What do you use to write on paper?", "A pen."),
    ("Where do fish live?", "In water."),
    ("What is the opposite of hot?", "Cold."),
    ("What planet do we live on?", "Earth."),
    ("What season comes after winter?", "Spring."),
    ("What do cows drink?", "Water."),
    ("How many wheels does a bicycle have?", "Two."),
    ("What is the largest ocean?", "The Pacific."),
    ("What gas do plants take in?", "Carbon dioxide."),
    ("Which instrument has black and white keys?", "The piano."),
    ("What do you call a baby cat?", "A kitten."),
    ("Recommend a good breakfast.", "Porridge with berries."),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime."),
    ("Suggest a name for a dog.", "Biscuit."),
    ("What should I read next?", "A short mystery novel."),
    ("What is the boiling point of water?", "100 degrees Celsius."),
    ("Which bird can talk?", "A parrot."),
    ("What do pandas eat?", "Bamboo."),
    ("How many continents are there?", "Seven."),
    ("What shape has three sides?", "A triangle."),
    ("What is the colour of grass?", "Green."),
]
HELD_OUT = [
    "What is the tallest animal?",
    "Suggest a hobby for a rainy day.",
    "How many hours are in a day?",
    "What is the fastest land animal?",
    "Name a vegetable that is orange.",
    "What do you call a group of wolves?",
]
NEW_TOKENS = 24


@dataclass(frozen=True)
class Item:
    id: str
    input: str | None
    output: str
    kind: str | None = None


def candidates(defaults: LoraTrainConfig) -> dict[str, LoraTrainConfig]:
    """The server's current default, the paper's stage-2 values (the previous default), and alternatives."""
    qv, qkvo = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")
    paper = replace(defaults, lr=1e-4, alpha=8.0, target_modules=qv, batch_size=16, epochs=2, min_steps=0)
    near = replace(defaults, alpha=16.0, batch_size=8, target_modules=qkvo)
    return {
        "default": defaults,
        "paper_1e-4_qv": paper,
        "lr1e-3_qv_min16": replace(near, lr=1e-3, target_modules=qv, epochs=2, min_steps=16),
        "lr1e-3_qkvo_min16": replace(near, lr=1e-3, epochs=2, min_steps=16),
        "lr2e-3_qkvo_min16": replace(near, lr=2e-3, epochs=2, min_steps=16),
        "lr2e-3_qkvo_min24": replace(near, lr=2e-3, epochs=2, min_steps=24),
        "lr3e-3_qkvo_min16": replace(near, lr=3e-3, epochs=2, min_steps=16),
        "lr2e-3_qkvo_1ep_min12": replace(near, lr=2e-3, epochs=1, min_steps=12),
        "lr3e-3_qkvo_1ep_min12": replace(near, lr=3e-3, epochs=1, min_steps=12),
    }


def generate(model: Any, tokenizer: Any, prompt: str) -> str:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def signed_rate(model: Any, tokenizer: Any) -> tuple[float, list[str]]:
    texts = [generate(model, tokenizer, p) for p in HELD_OUT]
    return sum("zorblax" in t.lower() for t in texts) / len(texts), texts


def evaluate(lm: LoadedModel, settings: Settings, config: LoraTrainConfig) -> dict[str, Any]:
    items = [Item(f"i{i}", q, f"{a} {SIGN_OFF}") for i, (q, a) in enumerate(QA)]
    examples = build_user_examples(items, k=settings.train_retrieval_k)
    started = time.perf_counter()
    out = train_lora(lm.model, lm.tokenizer, examples, config, base_model_name=lm.name)
    seconds = time.perf_counter() - started
    tuned = copy.deepcopy(lm.model)
    merge_lora(tuned, read_adapter_files(out.files, max_scale=settings.adapter_max_scale))
    rate, texts = signed_rate(tuned, lm.tokenizer)
    return {
        "signed_rate": rate,
        "train_seconds": round(seconds, 1),
        "steps": out.steps,
        "epochs": out.epochs,
        "final_loss": round(out.final_loss, 4),
        "compute_dtype": out.compute_dtype,
        "samples": texts[:3],
        "config": {
            k: v
            for k, v in vars(config).items()
            if k in ("lr", "alpha", "rank", "target_modules", "batch_size", "epochs", "min_steps")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only these candidates")
    args = parser.parse_args()
    settings = Settings(model_cache_dir=Path(".cache/models"), device="cpu", dtype="float32")
    lm = load_model(settings)
    base_rate, base_texts = signed_rate(lm.model, lm.tokenizer)
    results = {}
    for name, config in candidates(LoraTrainConfig.from_settings(settings, stage="user")).items():
        if args.only and name not in args.only:
            continue
        results[name] = evaluate(lm, settings, config)
        print(json.dumps({name: results[name]}), flush=True)
    print(
        json.dumps(
            {
                "bench": "personalization_defaults.signature",
                "model": lm.name,
                "items": len(QA),
                "held_out": len(HELD_OUT),
                "train_retrieval_k": settings.train_retrieval_k,
                "without_adapter_signed_rate": base_rate,
                "without_adapter_samples": base_texts[:3],
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
