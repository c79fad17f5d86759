"""The recommender baselines on a hand-computed example: no rating of the user's own, none at or after the
cutoff, shrinkage chosen on dev."""

from __future__ import annotations

import pytest

from service.evaluation import baselines
from service.evaluation import movielens as ml


def _data() -> ml.MovieLens:
    movies = {i: ml.Movie(i, f"Movie {i}", ("Drama",)) for i in range(1, 6)}

    def rs(*rows: tuple[int, float, int]) -> list[ml.Rating]:
        return sorted((ml.Rating(m, r, t) for m, r, t in rows), key=lambda x: (x.timestamp, x.movie_id))

    ratings = {
        # the evaluated user: history m1 4.0, m2 2.0, m4 1.5; scored item m3 (gold 5.0) at t=100
        1: rs((1, 4.0, 10), (2, 2.0, 20), (4, 1.5, 25), (3, 5.0, 100)),
        2: rs((3, 5.0, 30), (1, 3.0, 40)),
        3: rs((3, 4.0, 50), (2, 1.0, 60)),
        4: rs((3, 1.0, 150)),  # after the cutoff: never read
        5: rs((3, 0.5, 100)),  # AT the cutoff: never read
    }
    return ml.MovieLens(movies=movies, ratings=ratings, tags={})


def _task(data: ml.MovieLens) -> ml.RatingTask:
    return ml.build_rating_task(data, n_users=1, history_items=3, test_items=1, min_ratings=4, seed=0)


def test_hand_computed_baselines() -> None:
    data = _data()
    task = _task(data)
    assert task.users[0].user_id == "ml_1" and [t.item_id for t in task.users[0].test] == ["m3"]
    index = baselines.RatingIndex(data)
    # Others before t=100: 5.0, 3.0, 4.0, 1.0 -> mu = 3.25 (the user's own 4.0, 2.0, 1.5 excluded).
    assert index.global_before(100, exclude_user=1) == (4, 13.0)
    # m3 by others before t=100: 5.0 and 4.0 (0.5 at t=100 and 1.0 at t=150 are not before the cutoff).
    assert index.movie_before(3, 100, exclude_user=1) == (2, 9.0)
    assert index.movie_before(1, 100, exclude_user=1) == (1, 3.0)  # the user's own m1 4.0 is not counted
    # user mean 2.5; bias = (9 - 2 * 3.25) / (lambda + 2)
    assert baselines.bias_predictions(task, index, 0.0) == [pytest.approx(2.5 + 1.25)]
    assert baselines.bias_predictions(task, index, 3.0) == [pytest.approx(2.5 + 0.5)]
    preds = baselines.predictions(task, index, shrinkage=3.0)
    assert preds["user_mean"] == [2.5]
    assert preds["user_median"] == [2.0]  # median of 4.0, 2.0, 1.5
    assert preds["global_mean"] == [pytest.approx(7.5 / 3)]  # history ratings of the evaluated users only
    with pytest.raises(ValueError, match="shrinkage"):
        baselines.bias_predictions(task, index, -1.0)


def test_shrinkage_and_strongest_baseline_are_chosen_on_dev() -> None:
    data = _data()
    index = baselines.RatingIndex(data)
    dev = _task(data)  # gold 5.0: the full bias (lambda 0) is best
    assert baselines.choose_shrinkage(dev, index) == 0.0
    dev.users[0].test[0] = ml.RatingItem("m3", 3, "Movie 3", ("Drama",), 2.5, 100)  # gold = the user mean
    assert baselines.choose_shrinkage(dev, index) == baselines.SHRINKAGE_GRID[-1]
    assert baselines.strongest({"user_mean": 0.7, "user_median": 0.69, "user_mean_item_bias": 0.71}) == "user_median"
    assert baselines.strongest({"user_mean": 0.7, "user_median": 0.7}) == "user_mean"  # tie: listed first


def test_hand_computed_genre_baseline() -> None:
    def item(i: int, genres: tuple[str, ...], rating: float) -> ml.RatingItem:
        return ml.RatingItem(f"m{i}", i, f"Movie {i}", genres, rating, i)

    history = [item(1, ("Drama",), 4.0), item(2, ("Comedy",), 2.0), item(3, ("Drama", "Comedy"), 3.0)]
    tests = [item(4, ("Drama",), 5.0), item(5, ("Drama", "Comedy"), 1.0), item(6, ("Horror",), 1.0), item(7, (), 1.0)]
    # mean 3.0; Drama residuals +1, 0 -> 1 / (2 + 5); Comedy -1, 0 -> -1 / (2 + 5); unseen genres move nothing
    got = baselines.genre_predictions(ml.UserSplit("ml_1", history, tests), fallback=0.0, shrinkage=5.0)
    assert got == pytest.approx([3.0 + 1 / 7, 3.0, 3.0, 3.0])
    assert baselines.genre_predictions(ml.UserSplit("ml_1", history, tests[:1]), fallback=0.0, shrinkage=0.0) == [
        pytest.approx(3.5)
    ]


def test_rounded_readout_and_its_choice_on_dev() -> None:
    assert [baselines.to_rating_grid(v) for v in (3.24, 3.25, 3.74, 3.76, 0.1, 5.3)] == [3.0, 3.5, 3.5, 4.0, 0.5, 5.0]
    preds = baselines.with_readouts({"user_mean": [3.2, 3.8], "m": [3.2]})
    assert preds == {"user_mean": [3.2, 3.8], "user_mean_round": [3.0, 4.0], "m": [3.2]}  # only baselines
    assert baselines.choose_readout({"continuous": 0.70, "rounded": 0.69}) == "rounded"
    assert baselines.choose_readout({"continuous": 0.70, "rounded": 0.70}) == "continuous"  # tie: as defined
    # the strongest among baselines at their readouts: a rounded key can win, ties go to the earlier name
    assert baselines.strongest({"user_mean_round": 0.69, "user_mean_item_bias": 0.70}) == "user_mean_round"
    assert baselines.strongest({"user_mean_item_bias_round": 0.7, "user_mean": 0.7}) == "user_mean"
    data = _data()
    both = baselines.predictions(_task(data), baselines.RatingIndex(data), shrinkage=3.0)
    assert set(both) == set(baselines.KEYS) and both["user_mean_item_bias_round"] == [3.0]  # 3.0 stays 3.0
    assert both["global_mean_round"] == [2.5]  # 7.5 / 3 = 2.5
