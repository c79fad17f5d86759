"""Per-user BM25 (rank_bm25) over history items, with a small LRU of built indexes.

An index is built from ONE user's items only and cached under that user's key; a changed history
stamp invalidates it. It knows nothing about SQL: callers pass the user's items in.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
from rank_bm25 import BM25Okapi

from service.retrieval.tokenize import terms

T = TypeVar("T")


class Doc(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def input(self) -> str | None: ...
    @property
    def output(self) -> str: ...


class _LuceneBM25(BM25Okapi):  # type: ignore[misc]
    """BM25Okapi with Lucene's always-positive idf. rank_bm25's Okapi idf goes negative for a term in
    more than half the docs, which breaks small personal histories (1 doc -> every score < 0).

    Scores come from postings built once (per term: doc positions and counts), the same formula as
    BM25Okapi.get_scores, which instead loops in Python over every doc for every query term
    (~5-30 ms per query at 10,000 items)."""

    def __init__(self, corpus: list[list[str]]) -> None:
        super().__init__(corpus)
        docs: dict[str, list[int]] = {}
        counts: dict[str, list[int]] = {}
        for i, freqs in enumerate(self.doc_freqs):
            for word, count in freqs.items():
                docs.setdefault(word, []).append(i)
                counts.setdefault(word, []).append(count)
        self._postings = {
            w: (np.asarray(d, dtype=np.int64), np.asarray(counts[w], dtype=np.float64)) for w, d in docs.items()
        }
        doc_len = np.asarray(self.doc_len, dtype=np.float64)
        self._norm = self.k1 * (1.0 - self.b + self.b * doc_len / self.avgdl)

    def _calc_idf(self, nd: dict[str, int]) -> None:
        self.idf = {w: math.log(1.0 + (self.corpus_size - f + 0.5) / (f + 0.5)) for w, f in nd.items()}

    def get_scores(self, query: list[str]) -> np.ndarray:  # type: ignore[type-arg]
        scores = np.zeros(self.corpus_size)
        for term in query:  # a repeated query term counts again, as in rank_bm25
            posting = self._postings.get(term)
            if posting is not None:
                docs, tf = posting
                scores[docs] += self.idf[term] * tf * (self.k1 + 1.0) / (tf + self._norm[docs])
        return scores


def doc_terms(docs: Sequence[Doc]) -> list[list[str]]:
    return [terms(doc_text(d)) or ["\x00"] for d in docs]  # rank_bm25 dislikes empty docs


def doc_text(doc: Doc) -> str:
    return f"{doc.input or ''} {doc.output}"


@dataclass(frozen=True)
class Hit:
    index: int  # position in the docs the index was built from
    score: float


class BM25Index:
    def __init__(self, docs: Sequence[Doc]) -> None:
        self._init_terms(doc_terms(docs))

    @classmethod
    def from_terms(cls, corpus: list[list[str]]) -> BM25Index:
        """An index over already tokenized docs (see doc_terms): prefixes of one history, cheaply."""
        index = cls.__new__(cls)
        index._init_terms(corpus)
        return index

    def _init_terms(self, corpus: list[list[str]]) -> None:
        self.size = len(corpus)
        self._bm25 = _LuceneBM25(corpus) if corpus else None

    def top_k(self, query: str, k: int, *, limit: int | None = None) -> list[Hit]:
        """Best k docs with a positive score; `limit` restricts to the first `limit` docs (earlier items)."""
        n = self.size if limit is None else min(limit, self.size)
        q = terms(query)
        if self._bm25 is None or k <= 0 or n == 0 or not q:
            return []
        scores = np.asarray(self._bm25.get_scores(q))[:n]
        k = min(k, n)
        # Candidates: positive scores at least the k-th best, so that docs tied with the k-th one all
        # compete; then ties are broken by recency (later index first), also across the k boundary.
        kth = np.partition(scores, n - k)[n - k]
        cand = np.flatnonzero((scores >= kth) & (scores > 0))
        ranked = cand[np.lexsort((-cand, -scores[cand]))][:k]  # the last key is the primary one
        return [Hit(int(i), float(scores[i])) for i in ranked]


class BM25Cache(Generic[T]):
    """LRU of per-user entries (an index and the docs it was built from), keyed by the user's internal
    key and valid only for one stamp of the user's history (count, max id), so writes made by another
    replica invalidate it too."""

    def __init__(self, max_users: int = 64) -> None:
        self._max = max_users
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[Hashable, T]] = OrderedDict()

    def get(self, user_key: Hashable, stamp: Hashable) -> T | None:
        with self._lock:
            entry = self._entries.get(user_key)
            if entry is None or entry[0] != stamp:
                return None
            self._entries.move_to_end(user_key)
            return entry[1]

    def put(self, user_key: Hashable, stamp: Hashable, value: T) -> None:
        with self._lock:
            self._entries[user_key] = (stamp, value)
            self._entries.move_to_end(user_key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def invalidate(self, user_key: Hashable) -> None:
        with self._lock:
            self._entries.pop(user_key, None)
