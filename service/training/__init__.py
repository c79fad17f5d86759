"""Training: history -> examples (earlier-items retrieval) and PEFT LoRA training/merging. No SQL here."""
