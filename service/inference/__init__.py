"""The base model: loading, prompt encoding, the batched generation loop and its runtime."""
