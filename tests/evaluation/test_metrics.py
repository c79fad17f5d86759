import math

import pytest

from service.evaluation.metrics import (
    MetricResult,
    absolute_errors,
    markdown_table,
    paired_bootstrap_ci,
    parse_rating,
    score_predictions,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", 4.0),
        ("4.0", 4.0),
        ("3.5", 3.5),
        ("4/5", 4.0),
        ("Rating: 3.5", 3.5),
        ("**4**", 4.0),
        (" 0.5\n", 0.5),
        ("5.", 5.0),
        (".5", 0.5),
        ("I would say 2 stars", 2.0),
        ("0", None),
        ("5.5", None),
        ("-1", None),
        ("10/10", None),
        ("no idea", None),
        ("", None),
    ],
)
def test_parse_rating(text: str, expected: float | None) -> None:
    assert parse_rating(text) == expected


def test_mae_rmse_hand_computed() -> None:
    # errors: |4-3|=1, |2-2|=0, unparseable with gold 1 -> farthest is 5.0 -> 4.0, |5-4.5|=0.5
    golds = [4.0, 2.0, 1.0, 5.0]
    preds: list[float | None] = [3.0, 2.0, None, 4.5]
    assert absolute_errors(golds, preds) == [1.0, 0.0, 4.0, 0.5]
    r = score_predictions(golds, preds)
    assert r.n == 4
    assert r.mae == pytest.approx(5.5 / 4)
    assert r.rmse == pytest.approx(math.sqrt((1 + 0 + 16 + 0.25) / 4))
    assert r.parse_failure_rate == 0.25


def test_unparseable_rule_uses_farthest_bound() -> None:
    # gold 3.0: max(|3-0.5|, |3-5|) = 2.5; gold 4.5: 4.0; out-of-range prediction counts as a failure
    assert absolute_errors([3.0, 4.5, 2.0], [None, None, 7.0]) == [2.5, 4.0, 3.0]
    assert absolute_errors([3.0], [None], min_rating=1.0, max_rating=5.0) == [2.0]
    assert score_predictions([2.0], [7.0]).parse_failure_rate == 1.0


def test_score_predictions_validates() -> None:
    with pytest.raises(ValueError, match="2 golds but 1"):
        score_predictions([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        score_predictions([], [])
    with pytest.raises(ValueError, match="outside"):
        score_predictions([6.0], [1.0])


def test_bootstrap_contains_true_diff_and_is_reproducible() -> None:
    # a is exactly 0.5 worse than b on every item, plus item-level noise shared by both methods.
    errors_b = [(i % 7) * 0.25 for i in range(200)]
    errors_a = [e + 0.5 + (0.1 if i % 2 else -0.1) for i, e in enumerate(errors_b)]
    ci = paired_bootstrap_ci(errors_a, errors_b, n_resamples=500, seed=3)
    assert ci.n == 200
    assert ci.mean_diff == pytest.approx(0.5)
    assert ci.low <= 0.5 <= ci.high
    assert ci.high - ci.low < 0.05
    assert paired_bootstrap_ci(errors_a, errors_b, n_resamples=500, seed=3) == ci
    assert paired_bootstrap_ci(errors_a, errors_b, n_resamples=500, seed=4) != ci


def test_bootstrap_constant_difference_is_degenerate() -> None:
    ci = paired_bootstrap_ci([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], n_resamples=50)
    assert (ci.mean_diff, ci.low, ci.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1.0], [1.0, 2.0])


def test_markdown_table() -> None:
    table = markdown_table({"base": MetricResult(1.0, 1.25, 0.1, 10), "oppu": MetricResult(0.5, 0.75, 0.0, 10)})
    lines = table.splitlines()
    assert lines[0] == "| method | n | MAE | RMSE | parse failures |"
    assert lines[2] == "| base | 10 | 1.0000 | 1.2500 | 10.0% |"
    assert lines[3] == "| oppu | 10 | 0.5000 | 0.7500 | 0.0% |"
