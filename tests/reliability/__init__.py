"""The reliability suite (issue 6): schema fuzzing, hostile ids and archive names, faults, noisy neighbours.
Its shared helpers live in tests/factories.py (random_lora_zip, also used by bench/soak.py)."""
