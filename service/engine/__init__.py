"""The engine boundary (`base.Engine`) and its implementations: builtin (our scheduler over LoRA slots) and
vllm (vLLM's engine stepped by our thread)."""
