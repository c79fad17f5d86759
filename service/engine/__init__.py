"""The engine boundary (`base.Engine`) and its implementations: builtin (our scheduler over LoRA slots)."""
