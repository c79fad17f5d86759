"""The builtin engine (the embedded default): continuous batching over LoRA slots on llama-style models."""
