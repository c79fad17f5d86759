"""The generate use case: user -> history/BM25 -> prompt -> adapter -> batch -> response."""
