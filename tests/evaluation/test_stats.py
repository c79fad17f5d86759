"""User-level bootstrap, readouts and their dev-only choice, within/between-user correlations."""

from __future__ import annotations

import pytest

from service.evaluation import analysis, stats
from service.evaluation.metrics import paired_bootstrap_ci


def _planted() -> tuple[list[str], list[float], list[float]]:
    """4 users x 25 items; a user's items all move together: three users favour a (-1.0), one favours b
    (+0.8). 100 items look like strong evidence; 4 users are not."""
    users, a, b = [], [], []
    for u, diff in (("u1", -1.0), ("u2", -1.0), ("u3", -1.0), ("u4", 0.8)):
        for _ in range(25):
            users.append(u)
            a.append(1.0 + diff)
            b.append(1.0)
    return users, a, b


def test_user_level_ci_is_wider_than_item_level_on_correlated_items() -> None:
    users, a, b = _planted()
    item = stats.paired_ci(users, a, b, level="item", n_resamples=2000, seed=0)
    user = stats.paired_ci(users, a, b, level="user", n_resamples=2000, seed=0)
    assert item.mean_diff == user.mean_diff == pytest.approx(-0.55)
    assert (item.n_items, item.n_users, user.n_users) == (100, 4, 4)
    # Items as independent: a confident win. Users resampled: P(>= 3 of 4 draws are u4) = 5.1% > 2.5%,
    # so the upper bound is (3 * 0.8 - 1) / 4 = +0.35 and the CI includes 0.
    assert item.excludes_zero and item.high < -0.3
    assert not user.excludes_zero and user.high == pytest.approx(0.35)
    assert user.low == pytest.approx(-1.0)


def test_user_level_equals_item_level_when_every_item_is_its_own_user() -> None:
    a = [0.5, 1.0, 0.0, 2.0, 1.5, 0.5, 0.0]
    b = [1.0, 0.5, 0.5, 1.0, 1.0, 1.0, 0.5]
    users = [f"u{i}" for i in range(len(a))]
    user = stats.paired_ci(users, a, b, level="user", n_resamples=300, seed=3)
    old = paired_bootstrap_ci(a, b, n_resamples=300, seed=3)
    assert (user.low, user.high) == pytest.approx((old.low, old.high))
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_ci(users[:2], a, b)


def test_readouts_of_a_distribution() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    probs = [0.1, 0.1, 0.2, 0.5, 0.1]
    assert stats.expected_value(values, probs) == pytest.approx(3.4)
    assert stats.median_value(values, probs) == 4.0  # cumulative 0.4 at 3, 0.9 at 4
    assert stats.median_value(values, [0.5, 0.0, 0.0, 0.0, 0.5]) == 1.0  # exactly half reaches it
    assert sum(stats.normalise([-1.0, -2.0, -3.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ascending"):
        stats.median_value([2.0, 1.0], [0.5, 0.5])


def test_readout_rule_uses_dev_only() -> None:
    assert stats.choose_readout({"greedy": 0.80, "ev": 0.70, "median": 0.75}) == "ev"
    assert stats.choose_readout({"greedy": 0.70, "ev": 0.70}) == "greedy"  # tie: the simpler readout
    # On TEST greedy is far better, on DEV the expected value is: the comparison uses the expected value.
    test = analysis.Rows(
        users=["u1", "u1", "u2", "u2"],
        golds=[4.0, 2.0, 3.0, 5.0],
        preds={
            "user_mean": [3.0, 3.0, 4.0, 4.0],
            "user_mean_item_bias": [3.5, 2.5, 3.5, 4.5],
            "m": [4.0, 2.0, 3.0, 5.0],  # greedy: perfect on test
            "m_ev": [3.0, 3.0, 3.0, 3.5],
        },
    )
    dev_mae = {"m": 0.9, "m_ev": 0.6, "user_mean": 0.7, "user_mean_item_bias": 0.8}
    out = analysis.analyse(test, ["m"], reference="m", dev_mae=dev_mae, resamples=50)
    assert out["readouts"]["m"] == {"readout": "ev", "chosen_on": "dev split", "dev_mae": {"greedy": 0.9, "ev": 0.6}}
    assert out["strongest_baseline"]["name"] == "user_mean"  # best on dev, although worse on test
    first = out["comparisons"][0]
    assert (first["a"], first["b"]) == ("m_ev", "user_mean")
    assert first["mean_diff"] == pytest.approx(-0.125)  # |errs| ev 1,1,0,1.5 vs mean 1,1,1,1
    none = analysis.analyse(test, ["m"], reference="m", dev_mae=None, resamples=50)
    assert none["readouts"]["m"]["readout"] == "greedy" and "a priori" in none["readouts"]["m"]["chosen_on"]


def test_baseline_readout_and_strongest_baseline_use_dev_only() -> None:
    # On TEST the rounded bias baseline is exact; on DEV its continuous value and the user's mean are better.
    test = analysis.Rows(
        users=["u1", "u1", "u2", "u2"],
        golds=[4.0, 2.0, 3.0, 5.0],
        preds={
            "user_mean": [3.0, 3.0, 4.0, 4.0],
            "user_mean_round": [3.0, 3.0, 4.0, 4.0],
            "user_mean_item_bias": [3.8, 2.2, 3.2, 4.8],
            "user_mean_item_bias_round": [4.0, 2.0, 3.0, 5.0],
            "m": [3.0, 3.0, 3.0, 3.0],
        },
    )
    dev_mae = {"m": 0.9, "user_mean": 0.75, "user_mean_round": 0.7, "user_mean_item_bias": 0.71}
    dev_mae["user_mean_item_bias_round"] = 0.72
    out = analysis.analyse(test, ["m"], reference="m", dev_mae=dev_mae, resamples=50)
    assert out["baseline_readouts"]["user_mean_item_bias"]["readout"] == "continuous"
    assert out["baseline_readouts"]["user_mean"] == {
        "readout": "rounded",
        "chosen_on": "dev split",
        "dev_mae": {"continuous": 0.75, "rounded": 0.7},
    }
    assert out["strongest_baseline"]["name"] == "user_mean_round"
    pairs = [(c["a"], c["b"]) for c in out["comparisons"]]
    assert pairs == [("m", "user_mean_round"), ("m", "user_mean_item_bias")]  # each baseline at its dev readout
    none = analysis.analyse(test, ["m"], reference="m", dev_mae=None, resamples=50)
    assert none["strongest_baseline"]["name"] == "user_mean_item_bias"
    assert none["baseline_readouts"]["user_mean"]["readout"] == "continuous"


def test_within_and_between_user_correlations() -> None:
    users = ["a", "a", "b", "b"]
    golds = [5.0, 3.0, 2.0, 1.0]
    means = {"a": 4.0, "b": 1.5}
    # Knows each user's level but not the items: within-user r is undefined (constant), between-user is 1.
    level = [4.0, 4.0, 1.5, 1.5]
    assert stats.within_user_corr(users, level, golds, means) is None
    assert stats.between_user_corr(users, level, golds) == pytest.approx(1.0)
    # Knows which items a user prefers, but not how high anyone rates: after removing the history means the
    # predictions are [-0.9, -1.1, 1.6, 1.4] (mean 0.25) against golds [1, -1, 0.5, -0.5] (mean 0), so the
    # levels the method does not know dominate: r = 0.3 / sqrt(6.29 * 2.5) = 0.0757, far from 1.
    items = [3.1, 2.9, 3.1, 2.9]
    assert stats.within_user_corr(users, items, golds, means) == pytest.approx(0.3 / (6.29 * 2.5) ** 0.5)
    assert stats.within_user_corr(users, items, golds, means) == pytest.approx(0.0757, abs=5e-5)
    assert stats.within_user_corr(users, [4.5, 3.5, 1.75, 1.25], golds, means) == pytest.approx(1.0)


def test_items_only_within_user_correlation_ignores_per_user_constants() -> None:
    users = ["a", "a", "a", "b", "b", "b"]
    golds = [5.0, 4.0, 3.0, 3.0, 2.0, 1.0]
    means = {"a": 3.0, "b": 3.0}  # both users drifted from their history mean in opposite directions
    drift = [4.0, 4.0, 4.0, 2.0, 2.0, 2.0]  # knows only the drift, nothing about the items
    assert stats.within_user_corr(users, drift, golds, means) == pytest.approx(0.6**0.5)  # looks like skill
    assert stats.within_user_corr_items_only(users, drift, golds) is None  # is none
    ranks = [3.2, 3.1, 3.0, 3.2, 3.1, 3.0]  # knows the order of items within each user
    assert stats.within_user_corr_items_only(users, ranks, golds) == pytest.approx(1.0)
