from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.evaluation.movielens import (
    MovieLens,
    RatingItem,
    RatingTask,
    UserSplit,
    build_rating_task,
    check_no_leakage,
    global_mean,
    history_item,
    item_input,
    load_movielens,
    rating_question,
    user_mean,
)

ML_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens-latest-small"  # ../shared


@pytest.fixture(scope="module")
def ml() -> MovieLens:
    if not (ML_DIR / "ratings.csv").exists():
        pytest.fail(f"MovieLens latest-small not found at {ML_DIR} (the project's ../shared folder)")
    return load_movielens(ML_DIR)


def _write(path: Path, text: str) -> None:
    path.write_text(text.strip() + "\n", encoding="utf-8")


@pytest.fixture
def tiny(tmp_path: Path) -> MovieLens:
    _write(
        tmp_path / "movies.csv",
        """movieId,title,genres
1,Toy Story (1995),Adventure|Animation
2,"Heat, The (1995)",Action|Crime
3,Blank (2000),(no genres listed)
4,Four (2001),Drama
5,Five (2002),Comedy""",
    )
    # user 7: ts 100..500, with two movies sharing ts 300 (tie broken by movieId)
    _write(
        tmp_path / "ratings.csv",
        """userId,movieId,rating,timestamp
7,5,5.0,500
7,1,4.0,100
7,3,2.5,300
7,2,3.0,300
7,4,1.0,400
8,1,3.0,50
8,2,2.0,60""",
    )
    _write(
        tmp_path / "tags.csv",
        """userId,movieId,tag,timestamp
7,1,pixar,150
7,1,too late,450
7,5,spoiler,510""",
    )
    return load_movielens(tmp_path)


def test_tiny_load(tiny: MovieLens) -> None:
    assert tiny.movies[2].title == "Heat, The (1995)"
    assert tiny.movies[3].genres == ()
    assert [(r.movie_id, r.timestamp) for r in tiny.ratings[7]] == [
        (1, 100),
        (2, 300),
        (3, 300),
        (4, 400),
        (5, 500),
    ]
    assert [t.tag for t in tiny.tags[7]] == ["pixar", "too late", "spoiler"]


def test_tiny_split_and_tags(tiny: MovieLens) -> None:
    task = build_rating_task(tiny, n_users=1, history_items=2, test_items=2, min_ratings=5, seed=0)
    (split,) = task.users
    assert split.user_id == "ml_7"
    assert [i.item_id for i in split.history] == ["m2", "m3"]
    assert [i.item_id for i in split.test] == ["m4", "m5"]
    assert all(i.tags == () for i in split.test)  # test tags could reveal the answer
    task = build_rating_task(tiny, n_users=1, history_items=10, test_items=2, min_ratings=5, seed=0)
    first = task.users[0].history[0]
    assert first.item_id == "m1"
    assert first.tags == ("pixar",)  # "too late" was given after the first test rating
    assert history_item(first)["metadata"] == {"tags": ["pixar"]}
    assert "metadata" not in history_item(task.users[0].history[1])
    assert task.config["split"] == "temporal" and task.config["seed"] == 0


def test_dev_split_never_reads_the_test_items(tiny: MovieLens) -> None:
    test = build_rating_task(tiny, n_users=1, history_items=2, test_items=1, min_ratings=4, seed=0)
    dev = build_rating_task(tiny, n_users=1, history_items=2, test_items=1, min_ratings=4, seed=0, holdout=1)
    assert [i.item_id for i in test.users[0].test] == ["m5"]
    # dev scores the rating just before the test one; the test movie and its tag appear nowhere
    assert [i.item_id for i in dev.users[0].test] == ["m4"]
    assert [i.item_id for i in dev.users[0].history] == ["m2", "m3"]
    assert dev.config["holdout"] == 1
    assert "spoiler" not in repr(dev) and "m5" not in repr(dev)
    with pytest.raises(ValueError, match=">= 7 ratings"):  # holdout raises the bar per user
        build_rating_task(tiny, n_users=1, history_items=2, test_items=1, min_ratings=4, seed=0, holdout=3)
    with pytest.raises(ValueError, match="holdout"):
        build_rating_task(tiny, n_users=1, history_items=2, test_items=1, min_ratings=4, seed=0, holdout=-1)


def test_tiny_formats(tiny: MovieLens) -> None:
    task = build_rating_task(tiny, n_users=1, history_items=3, test_items=1, min_ratings=5, seed=0)
    h = task.users[0].history
    assert history_item(h[0]) == {
        "id": "m2",
        "input": "Heat, The (1995) | genres: Action, Crime",
        "output": "3.0",
        "kind": "rating",
        "timestamp": "1970-01-01T00:05:00Z",
    }
    assert item_input(h[1]) == "Blank (2000) | genres: unknown"
    assert rating_question(task.users[0].test[0]) == (
        'What score from 0.5 to 5.0 (in steps of 0.5) would this user give the movie "Five (2002)" '
        "(genres: Comedy)? Answer with only the number."
    )


def test_tiny_rejects_impossible_requests(tiny: MovieLens, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only 1 users"):
        build_rating_task(tiny, n_users=2, history_items=2, test_items=1, min_ratings=5, seed=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad / "movies.csv", "movieId,name,genres\n1,x,Drama")
    with pytest.raises(ValueError, match=r"movies.csv: missing column\(s\) \['title'\]"):
        load_movielens(bad)
    _write(bad / "movies.csv", "movieId,title,genres\n1,x,Drama")
    _write(bad / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,noon")
    with pytest.raises(ValueError, match=r"ratings.csv:2: column 'timestamp' is not an integer"):
        load_movielens(bad)


def test_means_use_history_only() -> None:
    def item(i: int, rating: float) -> RatingItem:
        return RatingItem(f"m{i}", i, "t", (), rating, i, ())

    a = UserSplit("ml_1", [item(1, 4.0), item(2, 5.0)], [item(3, 0.5)])
    b = UserSplit("ml_2", [item(1, 1.0)], [item(2, 0.5)])
    task = RatingTask([a, b])
    assert global_mean(task) == pytest.approx(10.0 / 3)
    assert user_mean(a) == 4.5
    assert user_mean(UserSplit("ml_3", [], [item(1, 3.0)]), fallback=3.25) == 3.25
    with pytest.raises(ValueError, match="empty history"):
        user_mean(UserSplit("ml_3", [], []))


def test_check_no_leakage_detects_problems() -> None:
    def item(i: int, ts: int) -> RatingItem:
        return RatingItem(f"m{i}", i, "t", (), 3.0, ts, ())

    check_no_leakage(RatingTask([UserSplit("ml_1", [item(1, 5), item(2, 10)], [item(3, 10)])]))
    with pytest.raises(AssertionError, match="test items in history"):
        check_no_leakage(RatingTask([UserSplit("ml_1", [item(1, 5)], [item(1, 10)])]))
    with pytest.raises(AssertionError, match="after first test"):
        check_no_leakage(RatingTask([UserSplit("ml_1", [item(1, 11)], [item(2, 10)])]))


def test_real_data_split(ml: MovieLens) -> None:
    task = build_rating_task(ml, n_users=5, history_items=20, test_items=3, min_ratings=50, seed=13)
    assert len(task.users) == 5
    check_no_leakage(task)
    for split in task.users:
        uid = int(split.user_id.removeprefix("ml_"))
        ratings = ml.ratings[uid]
        assert len(ratings) >= 50
        assert len(split.history) == 20 and len(split.test) == 3
        # test is the user's last three ratings; history the 20 just before them, in time order
        assert [i.movie_id for i in split.test] == [r.movie_id for r in ratings[-3:]]
        assert [i.movie_id for i in split.history] == [r.movie_id for r in ratings[-23:-3]]
        ts = [i.timestamp for i in split.history + split.test]
        assert ts == sorted(ts)
        assert max(i.timestamp for i in split.history) <= min(i.timestamp for i in split.test)
        assert not {i.item_id for i in split.history} & {i.item_id for i in split.test}
        for it in split.history:
            h = history_item(it)
            assert datetime.fromisoformat(h["timestamp"]) == datetime.fromtimestamp(it.timestamp, UTC)
            assert h["timestamp"].endswith("Z")
            assert h["input"] == item_input(it)
            assert 0.5 <= float(h["output"]) <= 5.0


def test_real_data_is_deterministic(ml: MovieLens) -> None:
    kwargs = {"n_users": 5, "history_items": 20, "test_items": 3, "min_ratings": 50}
    a = build_rating_task(ml, seed=1, **kwargs)
    b = build_rating_task(ml, seed=1, **kwargs)
    c = build_rating_task(ml, seed=2, **kwargs)
    assert a == b
    assert [u.user_id for u in a.users] != [u.user_id for u in c.users]


def test_real_data_known_values(ml: MovieLens) -> None:
    assert ml.movies[1].title == "Toy Story (1995)"
    assert ml.movies[1].genres == ("Adventure", "Animation", "Children", "Comedy", "Fantasy")
    assert sum(len(r) for r in ml.ratings.values()) == 100836
    assert len(ml.ratings) == 610
    first = ml.ratings[1][0]
    assert (first.timestamp, first.movie_id) == min((r.timestamp, r.movie_id) for r in ml.ratings[1])


def test_item_context_counts_other_users_strictly_before(tiny: MovieLens) -> None:

    from service.evaluation.movielens import ItemContext, check_context_leakage, with_item_context

    # user 8 rated m1 (3.0) at t=50 and m2 (2.0) at t=60; user 7's own ratings never count for user 7
    task = build_rating_task(tiny, n_users=1, history_items=3, test_items=2, min_ratings=5, seed=0)
    assert [i.item_id for i in task.users[0].history] == ["m1", "m2", "m3"]
    ctx = with_item_context(task, tiny)
    m1, m2, m3 = ctx.users[0].history
    assert m1.context == ItemContext(1, 3.0, 100)  # user 8's m1 at t=50
    assert m2.context == ItemContext(1, 2.0, 300)
    assert m3.context == ItemContext(0, None, 300) and ctx.users[0].test[0].context == ItemContext(0, None, 400)
    assert item_input(m1) == "Toy Story (1995) | genres: Adventure, Animation | rated by 1 others, mean 3.0"
    assert item_input(m3) == "Blank (2000) | genres: unknown | no ratings by others yet"
    assert history_item(m1)["input"] == item_input(m1)
    assert item_input(task.users[0].history[0]) == "Toy Story (1995) | genres: Adventure, Animation"  # flag off
    assert check_context_leakage(ctx, tiny) == 5 and check_context_leakage(task, tiny) == 0
    assert ctx.config["item_context"] is True


def test_planted_context_leaks_are_caught(tiny: MovieLens) -> None:
    from dataclasses import replace

    from service.evaluation.movielens import ItemContext, Rating, check_context_leakage, with_item_context

    plain = build_rating_task(tiny, n_users=1, history_items=3, test_items=2, min_ratings=5, seed=0)
    task = with_item_context(plain, tiny)

    def planted(index: int, context: ItemContext) -> RatingTask:
        split = task.users[0]
        history = list(split.history)
        history[index] = replace(history[index], context=context)
        return RatingTask([UserSplit(split.user_id, history, split.test)])

    # m1 at t=100: counting the user's OWN 4.0 beside user 8's 3.0
    with pytest.raises(AssertionError, match="m1: context 2 ratings"):
        check_context_leakage(planted(0, ItemContext(2, 3.5, 100)), tiny)
    # m1 read as of a later moment (after user 9's rating at t=200 below)
    tiny.ratings[9] = [Rating(1, 5.0, 100), Rating(2, 0.5, 200)]
    with pytest.raises(AssertionError, match="not its own time"):
        check_context_leakage(planted(0, ItemContext(1, 3.0, 250)), tiny)
    # user 9 rated m1 AT the item's timestamp (t=100): it must not count, so a context with it is a leak
    with pytest.raises(AssertionError, match=r"m1: context 2 ratings, mean 4\.0 but other users' ratings strictly"):
        check_context_leakage(planted(0, ItemContext(2, 4.0, 100)), tiny)
    assert with_item_context(task, tiny).users[0].history[0].context == ItemContext(1, 3.0, 100)
