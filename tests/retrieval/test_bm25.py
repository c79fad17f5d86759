"""Pure retrieval: tokenizer, BM25 top-k (ordering, ties, earlier-items limit) and the per-user LRU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from service.retrieval.bm25 import BM25Cache, BM25Index, doc_text
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
    """The postings-based scores equal rank_bm25's BM25Okapi.get_scores on the same statistics."""
    import random

    import numpy as np
    from rank_bm25 import BM25Okapi

    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(60)]
    idx = index(*(" ".join(rng.choices(vocab, k=rng.randint(1, 30))) for _ in range(300)))
    bm25 = idx._bm25
    assert bm25 is not None  # 300 documents: the index is built
    for _ in range(20):
        query = rng.choices([*vocab, "unknown"], k=rng.randint(1, 6))
        expected = BM25Okapi.get_scores(bm25, query)
        assert np.allclose(bm25.get_scores(query), expected, rtol=1e-12, atol=1e-12)
