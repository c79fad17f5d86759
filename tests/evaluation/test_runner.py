"""The evaluation runner end to end (small preset, tiny random model) and its leakage guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main
from service.evaluation import movielens as ml
from service.evaluation.protocol import (
    PRESETS,
    REFERENCE,
    check_example_leakage,
    check_history_leakage,
    parse_settings,
    preset_config,
)
from service.evaluation.reread import reread
from service.history.service import DocSnapshot
from service.training.examples import TrainExample
from tests.models import tiny_model_dir

ML_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens-latest-small"
LLM = {"non_personalized", "rag_k1", "rag_k4", "pag", "oppu", "oppu_rag", "oppu_pag"}
BASELINES = {"global_mean", "user_mean", "user_median", "user_mean_genre", "user_mean_item_bias"}
BASELINE_KEYS = BASELINES | {b + "_round" for b in BASELINES}  # each baseline continuous and rounded
METHODS = BASELINE_KEYS | LLM | {m + "_ev" for m in LLM} | {m + "_median" for m in LLM}


def _item(item_id: str, rating: float, ts: int) -> ml.RatingItem:
    return ml.RatingItem(item_id, int(item_id[1:]), f"Movie {item_id}", ("Drama",), rating, ts)


def _task() -> ml.RatingTask:
    split = ml.UserSplit("ml_1", history=[_item("m1", 4.0, 1), _item("m2", 3.0, 2)], test=[_item("m3", 5.0, 3)])
    return ml.RatingTask(users=[split])


def test_small_preset_end_to_end(tmp_path: Path) -> None:
    if not (ML_DIR / "ratings.csv").is_file():
        pytest.fail(f"MovieLens latest-small not found at {ML_DIR} (the project's ../shared folder)")
    out = tmp_path / "eval.json"
    argv = ["eval", "movielens", "--preset", "small", "--out", str(out), "--data", str(ML_DIR)]
    assert main([*argv, "--model", str(tiny_model_dir()), "--set", "bootstrap_resamples=500"]) == 0
    report = json.loads(out.read_text())
    small = PRESETS["small"]
    n = small.users * small.test_items
    assert set(report["methods"]) == METHODS
    for name, m in report["methods"].items():
        assert 0.0 <= m["mae"] <= m["rmse"] + 1e-9 and m["rmse"] <= 4.5, name
        assert 0.0 <= m["parse_failure_rate"] <= 1.0 and m["n"] == n, name
    assert report["methods"]["user_mean"]["parse_failure_rate"] == 0.0
    for m in LLM:  # the expected value is always a rating in range: never a parse failure
        assert report["methods"][m + "_ev"]["parse_failure_rate"] == 0.0
    # each LLM method (at its readout) vs the strongest baseline; oppu_rag vs the other LLM methods and baselines
    chosen = {m: m + {"greedy": "", "ev": "_ev", "median": "_median"}[report["readouts"][m]["readout"]] for m in LLM}
    pairs = {(c["a"], c["b"]) for c in report["comparisons"]}
    target = report["strongest_baseline"]["name"]
    assert target in BASELINE_KEYS and report["strongest_baseline"]["chosen_on"] == "dev split"
    base = report["baseline_readouts"]
    assert set(base) == BASELINES and all(b["chosen_on"] == "dev split" for b in base.values())
    at = {b + {"continuous": "", "rounded": "_round"}[c["readout"]] for b, c in base.items()}
    assert target in at and {(chosen[REFERENCE], b) for b in at - {target}} <= pairs
    assert {(chosen[m], target) for m in LLM} <= pairs
    assert {(chosen[REFERENCE], chosen[m]) for m in LLM - {REFERENCE}} <= pairs
    for c in report["comparisons"]:
        assert c["user_ci"][0] <= c["mean_diff"] <= c["user_ci"][1] and c["n_items"] == n
        assert c["n_users"] == small.users
    for row in report["predictions"]:  # the full distribution over the candidates, per item and method
        assert set(row["dist"]) == LLM and all(abs(sum(d) - 1) < 1e-4 and len(d) == 10 for d in row["dist"].values())
    assert report["config"]["machine"]["torch_threads"] >= 1 and "avx2" in report["config"]["machine"]["cpu_flags"]
    config = report["config"]
    assert config["preset"] == "small" and config["users"] == small.users and config["items"] == n
    assert config["bootstrap_resamples"] == 500 and config["holdout"] == 0
    leak = config["leakage_check"]
    assert leak["passed"] and leak["history_items"] == small.users * small.history_items
    assert leak["user_examples"] == small.users * small.history_items and leak["shared_examples"] > 0
    assert leak["retrieved_items"] > 0
    assert "| oppu_rag_median |" in report["table_markdown"] and report["timing"]["total_s"] > 0
    assert len(report["predictions"]) == n


def test_training_example_of_a_test_item_is_refused() -> None:
    task = _task()
    ok = [TrainExample("m1", "p", "4.0"), TrainExample("m2", "p", "3.0")]
    assert check_example_leakage(task, {"ml_1": ok}) == 2
    with pytest.raises(AssertionError, match="test item m3"):
        check_example_leakage(task, {"ml_1": [*ok, TrainExample("m3", "p", "5.0")]})
    with pytest.raises(AssertionError, match="not in the history"):
        check_example_leakage(task, {"ml_1": [TrainExample("m9", "p", "1.0")]})


def test_history_holding_a_test_item_is_refused() -> None:
    task = _task()
    docs = [DocSnapshot(h.item_id, ml.item_input(h), "4.0", "rating") for h in task.users[0].history]
    assert check_history_leakage(task, {"ml_1": docs}) == 2
    leaked = [*docs, DocSnapshot("m3", "Movie m3 | genres: Drama", "5.0", "rating")]
    with pytest.raises(AssertionError, match="test items stored in history"):
        check_history_leakage(task, {"ml_1": leaked})


def test_preset_overrides() -> None:
    config = preset_config("full", epochs=3, users=50)
    assert config.shared_epochs == config.user_epochs == 3 and config.users == 50
    assert PRESETS["full"].users >= 50
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="unknown option"):
        preset_config("small", colour="red")
    assert preset_config("full").holdout == 0
    assert preset_config("full", split="dev").holdout == PRESETS["full"].test_items
    with pytest.raises(ValueError, match="split must be"):
        preset_config("small", split="train")


def test_set_options_are_typed_after_the_config_fields() -> None:
    got = parse_settings(["user_lr=3e-3", "user_epochs=4", "shared_ks=0,4", "split=dev", "model=/m"])
    assert got == {"user_lr": 0.003, "user_epochs": 4, "shared_ks": (0, 4), "split": "dev", "model": "/m"}
    assert preset_config("full", **got).user_lr == 0.003
    for bad in ("colour=red", "user_lr", "user_epochs=two", "preset=small", "progress=true"):
        with pytest.raises(ValueError, match="--set"):
            parse_settings([bad])


def test_expected_rating_is_the_mean_under_the_scored_distribution() -> None:
    from service.evaluation.protocol import RATINGS
    from service.evaluation.stats import expected_value, median_value, normalise

    values = [float(r) for r in RATINGS]
    assert RATINGS[0] == "0.5" and RATINGS[-1] == "5.0" and len(RATINGS) == 10
    assert abs(expected_value(values, normalise([0.0] * 10)) - 2.75) < 1e-12  # uniform
    peaked = [-50.0] * 9 + [0.0]
    assert abs(expected_value(values, normalise(peaked)) - 5.0) < 1e-9
    two = [-1e9] * 10
    two[5], two[7] = -0.5, -0.5  # 3.0 and 4.0 equally likely, the rest impossible
    assert abs(expected_value(values, normalise(two)) - 3.5) < 1e-9
    assert median_value(values, normalise(two)) == 3.0


def test_large_preset_dev_then_test_on_a_tiny_configuration(tmp_path: Path) -> None:
    """The large run's exact commands, shrunk (2 users, 6 history items, stage 1 on 2 outside users): the dev
    run first, then the test run choosing each readout on the dev report; same users on both splits. The real run
    (page docs/eval/large.md) differs only in size."""
    if not (ML_DIR / "ratings.csv").is_file():
        pytest.fail(f"MovieLens latest-small not found at {ML_DIR} (the project's ../shared folder)")
    small = ["--users", "2", "--items", "6", "--test-items", "2", "--data", str(ML_DIR)]
    small += ["--model", str(tiny_model_dir())]
    sets = ["--set", "shared_users=2", "--set", "profile_new_tokens=2", "--set", "bootstrap_resamples=100"]
    dev, test = tmp_path / "dev.json", tmp_path / "test.json"
    assert main(["eval", "movielens", "--preset", "large", "--split", "dev", "--out", str(dev), *small, *sets]) == 0
    argv = ["eval", "movielens", "--preset", "large", "--out", str(test), *small, *sets]
    assert main([*argv, "--set", f"dev_report={dev}"]) == 0
    d, t = json.loads(dev.read_text()), json.loads(test.read_text())
    assert {r["user"] for r in d["predictions"]} == {r["user"] for r in t["predictions"]}
    assert not {(r["user"], r["item"]) for r in d["predictions"]} & {(r["user"], r["item"]) for r in t["predictions"]}
    for m in LLM:
        assert d["readouts"][m]["chosen_on"] == "this split (dev)" and t["readouts"][m]["chosen_on"] == "dev split"
        assert t["readouts"][m]["readout"] == d["readouts"][m]["readout"]
    config = t["config"]
    assert config["shared_pool"] == "outside" and config["leakage_check"]["shared_examples_from_evaluated_users"] == 0
    assert config["served_with_training_shape"] == {m: m == REFERENCE for m in LLM}
    assert not (tmp_path / "test.json.run").exists()  # a finished run leaves only its report
    # The page's re-read command rebuilds the same splits (eligibility counting the dev holdout) and comparisons.
    again = reread(t, ml.load_movielens(ML_DIR), dev_report=d, resamples=100)
    assert again["comparisons"] == t["comparisons"] and again["readouts"] == t["readouts"]
