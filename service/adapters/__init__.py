"""Adapters: the disk store, upload validation and zip archives for per-user PEFT LoRA adapters."""
