"""Pure retrieval: tokenizer, BM25 top-k (ordering, ties, earlier-items limit), the incremental and windowed
index (exactly a fresh index's scores), and the per-user LRU bounded by entries and bytes."""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from service.retrieval.bm25 import BM25Cache, BM25Index, doc_chars, doc_terms, doc_text
from service.retrieval.tokenize import terms


@dataclass(frozen=True)
class D:
    output: str
    input: str | None = None
    id: str = ""


def index(*outputs: str) -> BM25Index:
    return BM25Index([D(o) for o in outputs])


def order(idx: BM25Index, query: str, k: int, **kw: int) -> list[int]:
    return [h.index for h in idx.top_k(query, k, **kw)]


# --- tokenizer ---
def test_terms_lowercase_words_without_stop_words() -> None:
    assert terms("The Quick, brown FOX -- jumps; over the lazy dog!") == [
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
    ]
    assert terms("I don't like it's taste") == ["don't", "like", "it's", "taste"]
    assert terms("Café naïve Ünïcode 東京 2024") == ["café", "naïve", "ünïcode", "東京", "2024"]
    assert terms("snake_case and-dash") == ["snake_case", "dash"]
    assert terms("") == [] and terms("the a of to") == [] and terms("!!! ...") == []


def test_doc_text_joins_input_and_output() -> None:
    assert terms(doc_text(D("tasty ramen", input="Best dinner?"))) == ["best", "dinner", "tasty", "ramen"]
    assert terms(doc_text(D("only output"))) == ["only", "output"]


# --- BM25 top-k ---
def test_most_relevant_first() -> None:
    idx = index("cats are great pets", "dogs dogs dogs", "a dog and a cat", "stock market news")
    assert order(idx, "dogs", 4) == [1]
    assert order(idx, "cat dog", 4)[0] == 2  # the only doc with both terms
    assert order(idx, "stock market", 2) == [3]


def test_exact_text_ranks_first_among_similar_items() -> None:
    items = [f"review of the {w} phone camera and battery life" for w in ("red", "blue", "green", "black")]
    items.append("the blue phone camera is great but the battery life is short")
    idx = index(*items)
    for i, text in enumerate(items):
        assert order(idx, text, 3)[0] == i


def test_scores_are_positive_and_sorted() -> None:
    idx = index("apple banana", "apple", "banana cherry", "cherry cherry apple")
    hits = idx.top_k("apple cherry", 10)
    assert all(h.score > 0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_single_doc_scores_positive() -> None:
    # rank_bm25's Okapi idf is negative for a term in every doc; the Lucene idf keeps it positive.
    assert order(index("my only item"), "item", 3) == [0]


def test_ties_break_by_recency_across_the_k_boundary() -> None:
    idx = index(*["same words here"] * 7)
    assert order(idx, "words", 3) == [6, 5, 4]
    assert order(idx, "words", 7) == [6, 5, 4, 3, 2, 1, 0]
    # A better doc first, then equal ones newest first.
    idx = index("tea", "tea tea tea", "tea", "tea", "coffee")
    assert order(idx, "tea", 3) == [1, 3, 2]


def test_limit_restricts_to_earlier_items() -> None:
    idx = index("tea one", "coffee", "tea two", "tea three")
    assert order(idx, "tea", 5) == [3, 2, 0]  # equal scores: newest first
    assert order(idx, "tea", 5, limit=3) == [2, 0]
    assert order(idx, "tea", 5, limit=1) == [0]
    assert order(idx, "tea", 5, limit=0) == []
    assert order(idx, "tea", 5, limit=100) == [3, 2, 0]
    assert order(idx, "tea", 1, limit=3) == [2]


@pytest.mark.parametrize(
    ("docs", "query", "k"),
    [
        ((), "anything", 3),
        (("some text",), "", 3),
        (("some text",), "the of a", 3),
        (("some text",), "unrelated", 3),
        (("some text",), "text", 0),
        (("the a of",), "the", 3),
        (("", "   "), "text", 3),
    ],
)
def test_nothing_to_return(docs: tuple[str, ...], query: str, k: int) -> None:
    assert index(*docs).top_k(query, k) == []


def test_k_larger_than_corpus_and_zero_score_docs_dropped() -> None:
    idx = index("alpha", "beta", "alpha beta")
    assert sorted(order(idx, "alpha", 50)) == [0, 2]


def test_stop_word_only_docs_do_not_break_the_index() -> None:
    idx = index("the of and", "real words")
    assert order(idx, "words", 2) == [1]


# --- per-user LRU ---
def test_cache_get_put_stamp() -> None:
    cache = BM25Cache[str](4)
    assert cache.get("u1", (1, 1)) is None
    cache.put("u1", (1, 1), "index-1")
    assert cache.get("u1", (1, 1)) == "index-1"
    assert cache.get("u1", (2, 2)) is None  # history changed
    assert cache.get("u2", (1, 1)) is None  # another user, same stamp
    cache.put("u1", (2, 2), "index-2")
    assert cache.get("u1", (1, 1)) is None and cache.get("u1", (2, 2)) == "index-2"
    cache.invalidate("u1")
    assert cache.get("u1", (2, 2)) is None
    cache.invalidate("never-seen")


def test_cache_evicts_least_recently_used() -> None:
    cache = BM25Cache[int](2)
    cache.put("a", 0, 1)
    cache.put("b", 0, 2)
    assert cache.get("a", 0) == 1  # a is now the most recent
    cache.put("c", 0, 3)
    assert cache.get("b", 0) is None
    assert cache.get("a", 0) == 1 and cache.get("c", 0) == 3


def test_scores_match_rank_bm25_formula() -> None:
    """The postings-based scores equal rank_bm25's BM25Okapi.get_scores with Lucene's idf (its loop over every
    doc is the reference: same k1, b, avgdl and doc lengths)."""
    from rank_bm25 import BM25Okapi

    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(60)]
    docs = [D(" ".join(rng.choices(vocab, k=rng.randint(1, 30)))) for _ in range(300)]
    reference = BM25Okapi(doc_terms(docs))
    df = Counter(w for freqs in reference.doc_freqs for w in freqs)
    reference.idf = {w: math.log(1.0 + (300 - f + 0.5) / (f + 0.5)) for w, f in df.items()}
    idx = BM25Index(docs)
    for _ in range(20):
        query = rng.choices([*vocab, "unknown"], k=rng.randint(1, 6))
        assert np.allclose(idx.scores(query), reference.get_scores(query), rtol=1e-12, atol=1e-12)
    # A term repeated counts again (scored once per distinct term, times its count).
    repeated = ["w1"] * 500 + ["w2", "w1", "unknown"] * 7
    assert np.allclose(idx.scores(repeated), reference.get_scores(repeated), rtol=1e-12, atol=1e-12)


# --- the incremental index ---
def random_docs(rng: random.Random, n: int) -> list[D]:
    vocab = [f"w{i}" for i in range(rng.choice((5, 40, 400)))] + ["the", "of"]  # stop words: some docs empty
    return [D(" ".join(rng.choices(vocab, k=rng.randint(0, 30))), id=str(i)) for i in range(n)]


def extended_in_batches(rng: random.Random, docs: list[D], max_chars: int | None = None) -> BM25Index:
    idx = BM25Index(docs[:1], max_chars=max_chars)
    i = 1
    while i < len(docs):
        j = i + rng.choice((1, 1, 2, 7, 40))
        idx = idx.extended(docs[i:j])
        i = j
    return idx


@pytest.mark.parametrize("seed", range(12))
def test_extended_index_scores_exactly_like_a_fresh_one(seed: int) -> None:
    """Appends in batches (segments built and merged, no old doc tokenized again) give bit-for-bit the scores
    and hits of one index built over the same docs: doc counts, lengths, avgdl and idf all follow."""
    rng = random.Random(seed)
    docs = random_docs(rng, rng.randint(50, 600))
    fresh, incremental = BM25Index(docs), extended_in_batches(rng, docs)
    assert incremental.size == fresh.size == len(docs)
    assert len(incremental._segments) <= 2 * math.log2(len(docs)) + 1  # merged: few segments to query
    for _ in range(25):
        query = " ".join(rng.choices([d.output for d in docs] + ["w1 w2", "w3 unknown", "w0"], k=1))
        assert np.array_equal(incremental.scores(terms(query)), fresh.scores(terms(query)))
        assert incremental.top_k(query, 5) == fresh.top_k(query, 5)
        assert incremental.top_k(query, 3, limit=len(docs) // 2) == fresh.top_k(query, 3, limit=len(docs) // 2)


@pytest.mark.parametrize("seed", range(8))
def test_windowed_extended_index_is_the_fresh_index_over_the_most_recent_chars(seed: int) -> None:
    """With max_chars, an index extended in batches holds exactly the most recent docs whose characters fit
    (dropped docs leave every statistic at once, their memory in batches) and scores like a fresh index
    built over those docs only, after every batch."""
    rng = random.Random(100 + seed)
    docs = random_docs(rng, rng.randint(100, 400))
    max_chars = rng.choice((1, 50, 500, 3_000, 10**9))
    chars = [doc_chars(d) for d in docs]
    incremental, end, compacted = BM25Index(docs[:1], max_chars=max_chars), 1, False
    while end < len(docs):
        end = min(len(docs), end + rng.choice((1, 2, 7, 40)))
        incremental = incremental.extended(docs[incremental.end : end])
        compacted = compacted or incremental._origin > 0
        first = next(i for i in range(end) if sum(chars[i:end]) <= max_chars or i == end - 1)
        assert (incremental.first, incremental.end) == (first, end)
        kept, windowed = BM25Index(docs[first:end]), BM25Index(docs[:end], max_chars=max_chars)
        for query in [*rng.choices([d.output for d in docs[:end]], k=3), "w1 w2", "w0"]:
            assert np.array_equal(incremental.scores(terms(query)), kept.scores(terms(query)))
            assert incremental.top_k(query, 5) == kept.top_k(query, 5) == windowed.top_k(query, 5)
    assert compacted or max_chars == 10**9  # dropped docs left the memory too


def test_a_build_in_chunks_scores_like_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.retrieval.bm25 as bm25_module

    rng = random.Random(5)
    docs = random_docs(rng, 300)
    whole = BM25Index(docs, max_chars=4_000)
    monkeypatch.setattr(bm25_module, "_BUILD_CHUNK", 7)
    chunked = BM25Index(docs, max_chars=4_000)
    assert len(chunked._segments) > 1 and chunked.first == whole.first > 0
    extended = BM25Index(docs[:10], max_chars=4_000).extended(docs[10:])  # one append of many docs
    assert (extended.first, extended.end) == (whole.first, whole.end)
    for query in [*rng.choices([d.output for d in docs], k=10), "w1 w2"]:
        assert np.array_equal(chunked.scores(terms(query)), whole.scores(terms(query)))
        assert np.array_equal(extended.scores(terms(query)), whole.scores(terms(query)))


def test_window_keeps_the_newest_doc_even_if_larger() -> None:
    docs = [D("tea " * 10), D("coffee " * 3), D("tea tea")]  # 40, 21, 7 characters
    assert (BM25Index(docs, max_chars=28).first, BM25Index(docs, max_chars=27).first) == (1, 2)
    assert BM25Index(docs, max_chars=1).first == 2
    idx = BM25Index(docs[:1], max_chars=28).extended(docs[1:2]).extended(docs[2:])
    assert idx.first == 1 and order(idx, "tea", 5) == [1]  # hit 1 = docs[2]: positions count from the first kept


def test_extending_tokenizes_only_the_new_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.retrieval.bm25 as bm25_module

    docs = random_docs(random.Random(7), 200)
    idx = BM25Index(docs[:150])
    seen: list[str] = []

    def counting_terms(text: str) -> list[str]:
        seen.append(text)
        return terms(text)

    monkeypatch.setattr(bm25_module, "terms", counting_terms)
    idx = idx.extended(docs[150:])
    assert seen == [doc_text(d) for d in docs[150:]]


def test_an_old_version_still_answers_after_extension() -> None:
    """Extending returns a new index sharing the old one's segments: a query running on the old version (a
    request that read the cache before) is not disturbed."""
    old = index("tea one", "coffee")
    new = old.extended([D("tea two")])
    assert order(old, "tea", 5) == [0] and old.size == 2
    assert order(new, "tea", 5) == [2, 0] and new.size == 3


def test_an_index_counts_its_vocabulary_at_the_strings_real_size() -> None:
    """CPython stores a str at 1, 2 or 4 bytes a character: 2,000 distinct terms of 200 astral letters each
    hold ~1.6 MB of characters, and the cache budget must see that, not 400k characters."""
    ascii_terms = [f"w{n:04d}" + "x" * 195 for n in range(2000)]
    astral_terms = [f"w{n:04d}" + "\U0001d41a" * 195 for n in range(2000)]  # MATHEMATICAL BOLD SMALL A: \w
    assert terms(astral_terms[0]) == [astral_terms[0]]
    ascii_index, astral_index = index(" ".join(ascii_terms)), index(" ".join(astral_terms))
    real = sum(sys.getsizeof(t) for t in astral_terms) - sum(sys.getsizeof(t) for t in ascii_terms)
    assert real > 2000 * 195 * 3
    assert astral_index.nbytes - ascii_index.nbytes == real


def test_cache_is_bounded_by_bytes_and_keeps_the_newest() -> None:
    cache = BM25Cache[str](10, max_bytes=100)
    cache.put("a", 0, "A", 40)
    cache.put("b", 0, "B", 40)
    assert cache.nbytes == 80
    cache.put("c", 0, "C", 40)  # 120 > 100: the least recently used goes
    assert cache.get("a", 0) is None and cache.get("b", 0) == "B" and cache.nbytes == 80
    cache.put("b", 1, "B2", 70)  # a user's new entry replaces its old one (bytes too)
    assert cache.get("c", 0) is None and cache.get("b", 1) == "B2" and cache.nbytes == 70
    cache.put("d", 0, "D", 500)  # larger than the budget alone: kept (the newest stays), the others go
    assert cache.get("d", 0) == "D" and cache.get("b", 1) is None and cache.nbytes == 500
    cache.invalidate("d")
    assert cache.nbytes == 0 and cache.peek("d") is None
    cache.put("e", 3, "E", 1)
    assert cache.peek("e") == (3, "E") and cache.get("e", 4) is None


def test_builds_wait_only_for_the_same_user() -> None:
    """One user's slow build does not hold another user's; a second build of the same user waits for it."""
    import threading

    cache = BM25Cache[str](4)
    entered: dict[str, threading.Event] = {"alice": threading.Event(), "bob": threading.Event()}

    def build(user: str) -> None:
        with cache.building(user):
            entered[user].set()

    with cache.building("alice"):
        threads = {u: threading.Thread(target=build, args=(u,)) for u in ("alice", "bob")}
        for t in threads.values():
            t.start()
        assert entered["bob"].wait(5)
        assert not entered["alice"].wait(0.2)  # still held by the first build
    assert entered["alice"].wait(5)
    for t in threads.values():
        t.join(5)
    assert cache._builders == {}  # no lock left behind per user


def test_a_build_that_started_before_an_invalidation_is_not_stored() -> None:
    # An erase invalidates the user while a request is still indexing their history (read before the erase
    # committed): that index must not go back into the cache afterwards.
    cache = BM25Cache[str](4)
    since = cache.token()
    cache.invalidate("u1")
    assert not cache.put("u1", (1, 1), "read-before-the-erase", since=since)
    assert cache.peek("u1") is None
    assert cache.put("u2", (1, 1), "another user", since=since)  # others are not affected
    assert cache.put("u1", (1, 1), "read-after", since=cache.token())


def test_a_build_older_than_the_invalidations_remembered_is_not_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.retrieval import bm25

    monkeypatch.setattr(bm25, "INVALIDATIONS_KEPT", 2)
    cache = BM25Cache[str](4)
    since = cache.token()
    for user in ("u1", "u2", "u3"):  # u1's invalidation is forgotten: any build older than it is refused
        cache.invalidate(user)
    assert not cache.put("u1", (1, 1), "x", since=since)
    assert not cache.put("u9", (1, 1), "x", since=since)
    assert cache.put("u9", (1, 1), "x", since=cache.token())
