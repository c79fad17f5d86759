import random

from service.prompts import CONTINUATION_PROMPT, build_prompt, training_request
from service.retrieval.bm25 import BM25Index
from service.training.examples import (
    TrainExample,
    build_shared_examples,
    build_user_examples,
    retrieval_plan,
)
from tests.factories import Item


def _history(user: str, n: int = 8) -> list[Item]:
    # Every item shares vocabulary ("pizza review") so BM25 always finds earlier matches.
    return [
        Item(f"{user}-{i}", f"pizza review number {i} from {user}", f"pizza was fine, tag {user}{i}x", "review")
        for i in range(n)
    ]


def test_first_item_has_no_context_and_later_items_only_earlier() -> None:
    items = _history("u")
    plan = retrieval_plan(items, k=3)
    assert plan[0] == []
    assert sorted(plan) == list(range(len(items)))
    for i, ids in plan.items():
        assert all(j < i for j in ids)
        assert len(ids) == min(i, 3)
    examples = build_user_examples(items, k=3)
    assert examples[0] == TrainExample("u-0", items[0].input or "", items[0].output)


def test_prompt_is_the_serving_prompt_for_the_same_retrieved_items() -> None:
    items = _history("u")
    plan = retrieval_plan(items, k=2)
    examples = build_user_examples(items, k=2, profile="Likes pizza.", item_chars=80, profile_chars=50)
    for i, ex in enumerate(examples):
        expected = build_prompt(
            training_request(items[i]),
            [items[j] for j in plan[i]],
            "Likes pizza.",
            item_chars=80,
            profile_chars=50,
        )
        assert (ex.item_id, ex.prompt, ex.target) == (items[i].id, expected, items[i].output)


def test_canary_in_a_later_item_never_leaks_into_earlier_prompts() -> None:
    items = _history("u", 10)
    items[6] = Item("u-6", "pizza review CANARYWORD pizza", "pizza CANARYWORD pizza")
    examples = build_user_examples(items, k=10)
    assert all("CANARYWORD" not in ex.prompt for ex in examples[:6])
    assert examples[6].prompt.count("CANARYWORD") == 1  # its own request only, never as context
    assert any("CANARYWORD" in ex.prompt for ex in examples[7:])  # and retrieval does find it later


def test_k_zero_gives_bare_requests_and_output_only_items_use_continuation() -> None:
    items = [Item("a", None, "first post"), Item("b", "question?", "answer")]
    assert [ex.prompt for ex in build_user_examples(items, k=0)] == [CONTINUATION_PROMPT, "question?"]


def test_shared_examples_never_mix_users_and_are_deterministic() -> None:
    users = {"alice": _history("alice"), "bob": _history("bob")}
    examples = build_shared_examples(users, k=3, max_per_user=None, seed=1)
    assert len(examples) == 16
    for ex in examples:
        owner, other = ("alice", "bob") if ex.item_id.startswith("alice") else ("bob", "alice")
        assert f"tag {other}" not in ex.prompt
        assert ex.prompt == build_user_examples(users[owner], k=3)[int(ex.item_id.split("-")[1])].prompt
    assert examples == build_shared_examples(dict(reversed(users.items())), k=3, max_per_user=None, seed=1)
    assert examples != build_shared_examples(users, k=3, max_per_user=None, seed=2)


def test_users_without_history_change_nothing_in_the_shared_examples() -> None:
    """jobs/tasks passes every user, those without history too (their histories are read one at a time)."""
    users = {"alice": _history("alice", 20), "bob": _history("bob", 12)}
    with_empty = {"aaron": [], **users, "carl": []}
    assert build_shared_examples(with_empty, k=2, max_per_user=5, seed=3) == build_shared_examples(
        users, k=2, max_per_user=5, seed=3
    )


def test_shared_max_per_user_samples_but_keeps_full_earlier_retrieval() -> None:
    users = {"alice": _history("alice", 20), "bob": _history("bob", 3)}
    examples = build_shared_examples(users, k=2, max_per_user=5, seed=0)
    assert sum(ex.item_id.startswith("alice") for ex in examples) == 5
    assert sum(ex.item_id.startswith("bob") for ex in examples) == 3
    full = {ex.item_id: ex for ex in build_user_examples(users["alice"], k=2)}
    assert all(ex == full[ex.item_id] for ex in examples if ex.item_id.startswith("alice"))


def test_later_items_do_not_change_earlier_rankings() -> None:
    """Retrieval for item i uses an index over items[:i] only: appending later items (which shift
    corpus statistics such as idf) leaves every earlier item's retrieved list unchanged."""
    base = [
        Item("a", "cats", "cats and dogs"),
        Item("b", "dogs", "dogs dogs bark"),
        Item("c", "fish", "cats like fish"),
        Item("d", "cats dogs", "what about cats or dogs"),
    ]
    later = [Item(f"z{i}", "dogs", "dogs everywhere dogs") for i in range(20)]
    short, long = retrieval_plan(base, k=2), retrieval_plan(base + later, k=2)
    assert {i: long[i] for i in range(len(base))} == short
    assert all(all(j < i for j in hits) for i, hits in long.items())


def _naive_plan(items: list[Item], k: int) -> dict[int, list[int]]:
    """The definition: item i retrieves from a fresh index over items[:i] only."""
    return {
        i: [hit.index for hit in BM25Index(items[:i]).top_k(training_request(item), k)] for i, item in enumerate(items)
    }


def test_the_growing_index_plans_exactly_what_a_fresh_index_per_item_would() -> None:
    rng = random.Random(3)
    words = [f"w{j}" for j in range(40)]
    items = [
        Item(f"u-{i}", " ".join(rng.choices(words, k=rng.randint(1, 8))), " ".join(rng.choices(words, k=5)))
        for i in range(150)  # past several segment merges of the growing index
    ]
    for k in (1, 4):
        assert retrieval_plan(items, k=k) == _naive_plan(items, k)
    assert retrieval_plan(items, k=4, positions=[149, 7, 7, 80]) == {i: _naive_plan(items, 4)[i] for i in (7, 80, 149)}


def test_max_examples_keeps_the_most_recent_items_with_retrieval_over_all_earlier_ones() -> None:
    items = _history("u", 12)
    every = build_user_examples(items, k=3)
    assert build_user_examples(items, k=3, max_examples=5) == every[-5:]
    assert build_user_examples(items, k=3, max_examples=50) == every
    assert build_user_examples(items, k=3, max_examples=0) == []


def test_examples_keep_what_their_prompt_was_built_from() -> None:
    # The trainer rebuilds an over-long prompt with less context (serving's rule) from these parts.
    items = _history("u", 5)
    for ex in build_user_examples(items, k=2, profile="likes pizza", item_chars=80):
        assert ex.parts is not None and ex.parts.build() == ex.prompt
        assert ex.parts.levels()[0] == ex.prompt and ex.parts.levels()[-1] == ex.parts.request
        assert ex.parts.profile == "likes pizza" and ex.parts.item_chars == 80
