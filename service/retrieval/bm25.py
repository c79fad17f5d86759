"""Per-user BM25 over history items: an append-only index in segments, and a byte-budgeted LRU of them.

An index is built from ONE user's items only and cached under that user's key. When the history grows, the
caller extends the cached index with the new items: only those are tokenized, and their postings go into a
new small segment (segments merge geometrically, as in Lucene, so a query sees O(log n) of them). Every
statistic (doc count, doc lengths, avgdl, document frequencies) is an integer kept or counted at query time,
so an extended index scores exactly like a fresh one over the same docs. An index may keep only the most
recent `max_chars` characters of docs (older docs leave the statistics at once and the memory in batches).

Scores are Okapi BM25 with k1=1.5, b=0.75 (rank_bm25's defaults) and Lucene's always-positive idf. It knows
nothing about SQL or settings: callers pass the user's items and the budgets in.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from service.forgetting import InvalidationLog
from service.retrieval.tokenize import terms

T = TypeVar("T")
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

K1 = 1.5
B = 0.75
EMPTY_DOC = "\x00"  # a doc without terms counts as one token, as it always did (rank_bm25 refused empty docs)
DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024
_TERM_BYTES = 72  # estimated bytes of one vocabulary entry besides the str object (dict slot + the int id)
_BUILD_CHUNK = 2_048  # docs tokenized at once by a whole build


class Doc(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def input(self) -> str | None: ...
    @property
    def output(self) -> str: ...


def doc_terms(docs: Sequence[Doc]) -> list[list[str]]:
    return [terms(doc_text(d)) or [EMPTY_DOC] for d in docs]


def doc_text(doc: Doc) -> str:
    return f"{doc.input or ''} {doc.output}"


def doc_chars(doc: Doc) -> int:
    """Characters of a doc as the history quota counts them (input + output)."""
    return len(doc.input or "") + len(doc.output)


@dataclass(frozen=True)
class Hit:
    index: int  # position in the docs the index holds (oldest kept doc = 0)
    score: float


class _Vocab:
    """term -> id, append-only, shared by every version of one user's index: an older version never meets
    the newer ids in its segments, so readers need no lock."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self.nbytes = 0

    def get(self, term: str) -> int | None:
        return self._ids.get(term)

    def ids(self, words: list[str]) -> Ints:
        with self._lock:
            ids = self._ids
            for term in sorted(set(words).difference(ids)):  # sorted: ids do not depend on hash seeds
                ids[term] = len(ids)
                # The str's real size: 1, 2 or 4 bytes a character (CPython), not len(term).
                self.nbytes += _TERM_BYTES + sys.getsizeof(term)
            return np.fromiter(map(ids.__getitem__, words), dtype=np.int64, count=len(words))


@dataclass(frozen=True, eq=False)
class _Segment:
    """Postings of docs [first, end): row r is term tids[r] (sorted), its entries are
    docs[starts[r]:starts[r+1]] (ascending doc positions) with their term counts tfs. Immutable."""

    first: int
    end: int
    tids: Ints
    starts: Ints
    docs: Ints
    tfs: npt.NDArray[np.int32]

    @property
    def size(self) -> int:
        return len(self.docs)

    @property
    def nbytes(self) -> int:
        return self.tids.nbytes + self.starts.nbytes + self.docs.nbytes + self.tfs.nbytes

    def postings(self, tid: int, lo: int) -> tuple[Ints, npt.NDArray[np.int32]] | None:
        """(docs, counts) of term `tid` among docs >= lo."""
        r = int(np.searchsorted(self.tids, tid))
        if r == len(self.tids) or self.tids[r] != tid:
            return None
        a, b = int(self.starts[r]), int(self.starts[r + 1])
        if lo > self.first:
            a += int(np.searchsorted(self.docs[a:b], lo))
        return (self.docs[a:b], self.tfs[a:b]) if a < b else None


def _build(vocab: _Vocab, corpus: Sequence[list[str]], first: int) -> _Segment:
    n = len(corpus)
    lens = np.fromiter(map(len, corpus), dtype=np.int64, count=n)
    tids = vocab.ids(list(itertools.chain.from_iterable(corpus)))
    # One key per (term, doc) token, sorted: unique keys are the postings, their counts the term counts.
    keys, tfs = np.unique(tids * n + np.repeat(np.arange(n, dtype=np.int64), lens), return_counts=True)
    row_tids, row_starts = np.unique(keys // n, return_index=True)
    starts = np.append(row_starts.astype(np.int64), len(keys))
    return _Segment(first, first + n, row_tids, starts, keys % n + first, tfs.astype(np.int32))


def _add_segment(segments: list[_Segment], seg: _Segment) -> None:
    """Append seg, then merge the last two while the older is at most twice the newer: each segment stays
    more than twice the next one (O(log n) segments to query), and a posting is merged O(log n) times."""
    segments.append(seg)
    while len(segments) >= 2 and segments[-2].size <= 2 * segments[-1].size:
        b, a = segments.pop(), segments.pop()
        segments.append(_merge(a, b))


def _placed(seg: _Segment, row_dest: Ints) -> Ints:
    """Where each entry of `seg` goes when its rows start at row_dest."""
    counts = np.diff(seg.starts)
    return np.repeat(row_dest - seg.starts[:-1], counts) + np.arange(seg.size, dtype=np.int64)


def _merge(a: _Segment, b: _Segment) -> _Segment:
    """One segment for two adjacent ones (a's docs all precede b's): no token is read again."""
    tids = np.union1d(a.tids, b.tids)
    ia, ib = np.searchsorted(tids, a.tids), np.searchsorted(tids, b.tids)
    ca = np.zeros(len(tids), dtype=np.int64)
    ca[ia] = np.diff(a.starts)
    cb = np.zeros(len(tids), dtype=np.int64)
    cb[ib] = np.diff(b.starts)
    starts = np.zeros(len(tids) + 1, dtype=np.int64)
    np.cumsum(ca + cb, out=starts[1:])
    pos_a, pos_b = _placed(a, starts[ia]), _placed(b, starts[ib] + ca[ib])  # within a row: a's docs first
    docs = np.empty(a.size + b.size, dtype=np.int64)
    docs[pos_a], docs[pos_b] = a.docs, b.docs
    tfs = np.empty(a.size + b.size, dtype=np.int32)
    tfs[pos_a], tfs[pos_b] = a.tfs, b.tfs
    return _Segment(a.first, b.end, tids, starts, docs, tfs)


def _trimmed(seg: _Segment, lo: int) -> _Segment | None:
    """The segment without its docs before lo (None: nothing left)."""
    if lo <= seg.first:
        return seg
    if lo >= seg.end:
        return None
    keep = seg.docs >= lo
    counts = np.add.reduceat(keep.astype(np.int64), seg.starts[:-1])
    rows = counts > 0
    starts = np.zeros(int(rows.sum()) + 1, dtype=np.int64)
    np.cumsum(counts[rows], out=starts[1:])
    return _Segment(lo, seg.end, seg.tids[rows], starts, seg.docs[keep], seg.tfs[keep])


class BM25Index:
    """An immutable index: `extended` returns a new one that shares this one's segments, so queries on the
    old version may run meanwhile. Docs get positions 0, 1, ... in the order they are given; with
    `max_chars`, only the most recent docs whose characters fit are kept (at least the newest one):
    positions [first, end). Hits are numbered from `first` (the oldest kept doc is 0)."""

    def __init__(self, docs: Sequence[Doc], *, max_chars: int | None = None) -> None:
        chars = [doc_chars(d) for d in docs]
        first = _window_start(np.cumsum([0, *chars], dtype=np.int64), max_chars)
        vocab, segments, lens = _Vocab(), list[_Segment](), np.zeros(len(docs), dtype=np.int64)
        for start in range(first, len(docs), _BUILD_CHUNK):  # in chunks: one chunk's tokens in memory at a time
            corpus = doc_terms(docs[start : start + _BUILD_CHUNK])  # only the kept docs are tokenized
            lens[start : start + len(corpus)] = np.fromiter(map(len, corpus), dtype=np.int64, count=len(corpus))
            _add_segment(segments, _build(vocab, corpus, start))
        self._init(vocab, tuple(segments), 0, first, len(docs), chars, lens, max_chars)

    @classmethod
    def from_terms(cls, corpus: list[list[str]]) -> BM25Index:
        """An index over already tokenized docs (see doc_terms), no window: prefixes of one history, cheaply."""
        index = cls.__new__(cls)
        vocab = _Vocab()
        segments = (_build(vocab, corpus, 0),) if corpus else ()
        lens = np.fromiter(map(len, corpus), dtype=np.int64, count=len(corpus))
        index._init(vocab, segments, 0, 0, len(corpus), [0] * len(corpus), lens, None)
        return index

    def _init(
        self,
        vocab: _Vocab,
        segments: tuple[_Segment, ...],
        origin: int,
        first: int,
        end: int,
        chars: Sequence[int] | Ints,
        lens: Ints,
        max_chars: int | None,
    ) -> None:
        """`chars` and `lens` (characters, terms) cover docs [origin, end); docs before `first` are out of the
        window (in memory until a compaction drops them)."""
        self._vocab, self._segments, self.max_chars = vocab, segments, max_chars
        self._origin, self.first, self.end = origin, first, end
        self._chars, self._lens = np.asarray(chars, dtype=np.int64), lens
        self._norm: Floats | None = None

    @property
    def size(self) -> int:
        return self.end - self.first

    @property
    def nbytes(self) -> int:
        """Estimated memory of the index (its docs' text is the caller's)."""
        arrays = sum(s.nbytes for s in self._segments) + self._chars.nbytes + self._lens.nbytes
        return arrays + self._vocab.nbytes + (self.size * 8 if self._norm is None else self._norm.nbytes)

    def extended(self, docs: Sequence[Doc]) -> BM25Index:
        """This index with `docs` appended after its docs: only they are tokenized. When the window drops
        every old doc, a fresh index (and vocabulary) over the new docs is built instead."""
        if not docs:
            return self
        chars = np.concatenate([self._chars, np.fromiter(map(doc_chars, docs), dtype=np.int64, count=len(docs))])
        end = self.end + len(docs)
        cum = np.concatenate([[0], np.cumsum(chars)])
        first = max(self.first, self._origin + _window_start(cum, self.max_chars))
        if first >= self.end:  # nothing old stays
            fresh = BM25Index(docs[first - self.end :], max_chars=self.max_chars)
            fresh._shift(first)
            return fresh
        segments = [s for s in self._segments if s.end > first]
        lens = np.concatenate([self._lens, np.zeros(len(docs), dtype=np.int64)])
        for start in range(0, len(docs), _BUILD_CHUNK):  # many appends at once: still one chunk of tokens
            corpus = doc_terms(docs[start : start + _BUILD_CHUNK])
            at = self.end + start
            lens[at - self._origin : at - self._origin + len(corpus)] = list(map(len, corpus))
            _add_segment(segments, _build(self._vocab, corpus, at))
        origin = self._origin
        if first - origin > (end - origin) // 2:  # mostly dead: free their memory (amortized)
            segments = [t for s in segments if (t := _trimmed(s, first)) is not None]
            chars, lens, origin = chars[first - origin :], lens[first - origin :], first
        index = BM25Index.__new__(BM25Index)
        index._init(self._vocab, tuple(segments), origin, first, end, chars, lens, self.max_chars)
        return index

    def _shift(self, by: int) -> None:
        """Renumber every doc by +by (a fresh index that continues an older one's positions)."""
        self._segments = tuple(
            _Segment(s.first + by, s.end + by, s.tids, s.starts, s.docs + by, s.tfs) for s in self._segments
        )
        self._origin, self.first, self.end = self._origin + by, self.first + by, self.end + by

    def _norms(self) -> Floats:
        """k1 * (1 - b + b * dl / avgdl) for every kept doc; avgdl from integer totals, as rank_bm25."""
        if self._norm is None:
            dl = self._lens[self.first - self._origin :]
            avgdl = int(dl.sum()) / self.size
            self._norm = K1 * (1.0 - B + B * dl.astype(np.float64) / avgdl)
        return self._norm

    def scores(self, query: list[str]) -> Floats:
        """BM25 score of every kept doc (oldest first) for query terms; a repeated term counts again (scored
        once, times its count: a prompt of one term repeated 16k times costs one pass, not 16k)."""
        n = self.size
        scores = np.zeros(n)
        if n == 0:
            return scores
        norm = self._norms()
        for term, count in Counter(query).items():
            tid = self._vocab.get(term)
            if tid is None:
                continue
            parts = [p for s in self._segments if (p := s.postings(tid, self.first)) is not None]
            if not parts:
                continue
            docs = (parts[0][0] if len(parts) == 1 else np.concatenate([d for d, _ in parts])) - self.first
            tf = (parts[0][1] if len(parts) == 1 else np.concatenate([c for _, c in parts])).astype(np.float64)
            f = len(docs)
            idf = math.log(1.0 + (n - f + 0.5) / (f + 0.5))  # Lucene's: positive even for a term in every doc
            scores[docs] += count * idf * tf * (K1 + 1.0) / (tf + norm[docs])
        return scores

    def top_k(self, query: str, k: int, *, limit: int | None = None) -> list[Hit]:
        """Best k docs with a positive score; `limit` restricts to the first `limit` docs (earlier items)."""
        n = self.size if limit is None else min(limit, self.size)
        q = terms(query)
        if k <= 0 or n <= 0 or not q:
            return []
        scores = self.scores(q)[:n]
        k = min(k, n)
        # Candidates: positive scores at least the k-th best, so that docs tied with the k-th one all
        # compete; then ties are broken by recency (later index first), also across the k boundary.
        kth = np.partition(scores, n - k)[n - k]
        cand = np.flatnonzero((scores >= kth) & (scores > 0))
        ranked = cand[np.lexsort((-cand, -scores[cand]))][:k]  # the last key is the primary one
        return [Hit(int(i), float(scores[i])) for i in ranked]


def _window_start(cum_chars: Ints, max_chars: int | None) -> int:
    """First doc of the longest suffix whose characters fit max_chars (at least the last doc); cum_chars
    holds the running totals (cum_chars[i] = characters of docs before i)."""
    n = len(cum_chars) - 1
    if max_chars is None or n == 0:
        return 0
    first = int(np.searchsorted(cum_chars, cum_chars[-1] - max_chars, side="left"))
    return min(first, n - 1)


INVALIDATIONS_KEPT = 4096  # users whose last invalidation a cache remembers (older ones: any build then refused)


class BM25Cache(Generic[T]):
    """LRU of per-user entries (an index and the docs it was built from), keyed by the user's internal
    key and valid only for one stamp of the user's history (count, max id), so writes made by another
    replica invalidate it too. Bounded by entries and by their estimated bytes; the newest entry always
    stays (its size is bounded by `window_chars`, the most recent characters an entry's builder keeps)."""

    def __init__(
        self, max_users: int = 64, *, max_bytes: int = DEFAULT_CACHE_BYTES, window_chars: int | None = None
    ) -> None:
        self._max = max_users
        self.max_bytes = max_bytes
        self.window_chars = window_chars
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[Hashable, T, int]] = OrderedDict()
        self._bytes = 0
        self._builders: dict[Hashable, tuple[threading.Lock, int]] = {}  # user -> (lock, holders and waiters)
        # A build that read the history before an invalidation (an erase) does not put its entry back after it.
        self._invalidated = InvalidationLog(INVALIDATIONS_KEPT)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, user_key: Hashable, stamp: Hashable) -> T | None:
        with self._lock:
            entry = self._entries.get(user_key)
            if entry is None or entry[0] != stamp:
                return None
            self._entries.move_to_end(user_key)
            return entry[1]

    def peek(self, user_key: Hashable) -> tuple[Hashable, T] | None:
        """The user's entry whatever its stamp (a base to extend), without touching the LRU order."""
        with self._lock:
            entry = self._entries.get(user_key)
            return None if entry is None else (entry[0], entry[1])

    def token(self) -> int:
        """Taken before a build reads the history; `put(..., since=token)` then stores nothing if the user was
        invalidated meanwhile."""
        with self._lock:
            return self._invalidated.token()

    def put(self, user_key: Hashable, stamp: Hashable, value: T, nbytes: int = 0, *, since: int | None = None) -> bool:
        """Stores the entry; False (nothing stored) when `user_key` may have been invalidated after `since`."""
        with self._lock:
            if since is not None and self._invalidated.since(user_key, since):
                return False
            old = self._entries.pop(user_key, None)
            self._bytes += nbytes - (old[2] if old is not None else 0)
            self._entries[user_key] = (stamp, value, nbytes)
            while len(self._entries) > 1 and (len(self._entries) > self._max or self._bytes > self.max_bytes):
                self._bytes -= self._entries.popitem(last=False)[1][2]
            return True

    def invalidate(self, user_key: Hashable) -> None:
        with self._lock:
            old = self._entries.pop(user_key, None)
            if old is not None:
                self._bytes -= old[2]
            self._invalidated.note(user_key)

    @contextmanager
    def building(self, user_key: Hashable) -> Iterator[None]:
        """Held while a user's entry is built or extended, so that concurrent requests of one user build it
        once (the others then find it); other users' builds do not wait on it."""
        with self._lock:
            lock, users = self._builders.get(user_key, (threading.Lock(), 0))
            self._builders[user_key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users = self._builders[user_key][1] - 1
                if users:
                    self._builders[user_key] = (lock, users)
                else:
                    del self._builders[user_key]
