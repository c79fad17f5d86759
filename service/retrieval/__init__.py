"""Retrieval of context from a user's own history (BM25)."""
