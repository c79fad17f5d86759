"""Benchmarks (run from the repository root: python -m bench.<name> or python bench/<name>.py)."""
