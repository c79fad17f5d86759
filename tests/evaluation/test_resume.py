"""A run interrupted after its first user and resumed gives the same report as an uninterrupted run
(tiny model, synthetic MovieLens: 2 evaluated users, stage 1 on 2 users outside them, item context on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.evaluation import movielens as ml
from service.evaluation import runner
from service.evaluation.protocol import EvalConfig
from service.evaluation.reread import interim_report, reread
from service.training.trainer import train_lora
from tests.models import tiny_model_dir


class Interrupted(Exception):
    pass


def _dataset(root: Path) -> Path:
    root.mkdir()
    movies = ["movieId,title,genres"] + [f"{m},Movie {m} ({1990 + m}),Drama|Comedy" for m in range(1, 11)]
    (root / "movies.csv").write_text("\n".join(movies) + "\n")
    rows = ["userId,movieId,rating,timestamp"]
    for u in range(1, 5):
        for j, m in enumerate(range(1, 11)):
            rows.append(f"{u},{m},{0.5 + ((u * 3 + m * 5) % 10) * 0.5},{1000 * j + 37 * u}")
    (root / "ratings.csv").write_text("\n".join(rows) + "\n")
    return root


def _config() -> EvalConfig:
    return EvalConfig(
        users=2,
        history_items=5,
        test_items=2,
        min_ratings=7,
        model=str(tiny_model_dir()),
        shared_pool="outside",
        item_context=True,
        shared_epochs=1,
        user_epochs=1,
        user_min_steps=1,
        profile_new_tokens=3,
        max_new_tokens=2,
        bootstrap_resamples=100,
        gen_batch=1,  # one row per engine step: bit-reproducible (batched numerics depend on the batch)
    )


def _without_wall_times(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps({k: v for k, v in report.items() if k != "timing"}))
    return out


def test_resume_gives_the_same_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _dataset(tmp_path / "ml")
    settings = Settings(model_cache_dir=tmp_path / "models")
    whole = runner.run_eval(_config(), data_dir=data, settings=settings, run_dir=tmp_path / "whole")
    assert whole["config"]["leakage_check"]["shared_examples_from_evaluated_users"] == 0
    # item context on every evaluated item (history + scored) and every outside user's history item
    assert whole["config"]["leakage_check"]["item_context"] == 2 * (5 + 2) + 2 * 5

    trained: list[int] = []
    real_answers = runner._user_answers

    def counting_train(*args: Any, **kwargs: Any) -> Any:
        trained.append(len(args[2]))
        return train_lora(*args, **kwargs)

    def interrupt_second(bench: Any, task: Any, split: Any) -> Any:
        if split.user_id != task.users[0].user_id:
            raise Interrupted
        return real_answers(bench, task, split)

    monkeypatch.setattr("service.evaluation.runner.train_lora", counting_train)
    monkeypatch.setattr(runner, "_user_answers", interrupt_second)
    with pytest.raises(Interrupted):
        runner.run_eval(_config(), data_dir=data, settings=settings, run_dir=tmp_path / "parts")
    assert sorted(p.name for p in (tmp_path / "parts" / "users").iterdir()) == ["0000.json"]
    assert len(trained) == 3  # stage 1, user 1, user 2 (interrupted during its answers)
    # Read before it ends, the folder is an interim report of its first user, scored on that user only.
    interim = interim_report(tmp_path / "parts")
    assert interim["interim"] == {"users_finished": 1, "users_planned": 2, "run_dir": str(tmp_path / "parts")}
    first = [r for r in whole["predictions"] if r["user"] == whole["predictions"][0]["user"]]
    assert [r["item"] for r in interim["predictions"]] == [r["item"] for r in first]
    for row, full in zip(interim["predictions"], first, strict=True):
        assert row["pred"].items() <= full["pred"].items() and row["dist"] == full["dist"]
    read = reread(interim, ml.load_movielens(data), dev_report=None, resamples=50)
    assert {c["n_users"] for c in read["comparisons"]} == {1}
    with pytest.raises(ValueError, match="--resume"):
        runner.run_eval(_config(), data_dir=data, settings=settings, run_dir=tmp_path / "parts")
    other = EvalConfig(**{**_config().__dict__, "seed": 1})
    with pytest.raises(ValueError, match="another configuration"):
        runner.run_eval(other, data_dir=data, settings=settings, run_dir=tmp_path / "parts", resume=True)

    monkeypatch.setattr(runner, "_user_answers", real_answers)
    trained.clear()
    resumed = runner.run_eval(_config(), data_dir=data, settings=settings, run_dir=tmp_path / "parts", resume=True)
    assert len(trained) == 1  # only the unfinished user: neither stage 1 nor user 1 is trained again
    assert resumed["timing"]["sessions"] == 2
    code = resumed["timing"]["code_per_session"]
    assert len(code) == 2 and code[0]["service_tree"] == code[1]["service_tree"]
    assert _without_wall_times(resumed) == _without_wall_times(whole)
    assert not (tmp_path / "parts").exists() and not (tmp_path / "whole").exists()  # finished: folders cleared


def test_an_interrupted_profile_stage_resumes_with_the_missing_profiles_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Profiles are kept as they finish: a run stopped after the first one generates only the others on resume,
    and reports what an uninterrupted run reports."""
    data = _dataset(tmp_path / "ml")
    settings = Settings(model_cache_dir=tmp_path / "models")
    whole = runner.run_eval(_config(), data_dir=data, settings=settings, run_dir=tmp_path / "whole")

    real_generate = runner._generate
    asked: list[int] = []  # how many profiles each profile stage generated
    stop = [True]

    def generate(bench: Any, specs: Any, desc: str, on_done: Any = None) -> Any:
        if desc != "profiles":
            return real_generate(bench, specs, desc, on_done)
        asked.append(len(specs))

        def keep_then_stop(i: int, text: str) -> None:
            on_done(i, text)
            if stop[0]:
                raise Interrupted

        return real_generate(bench, specs, desc, keep_then_stop)

    monkeypatch.setattr(runner, "_generate", generate)
    with pytest.raises(Interrupted):
        runner.run_eval(_config(), data_dir=data, settings=settings, run_dir=tmp_path / "parts")
    kept = json.loads((tmp_path / "parts" / runner.PARTIAL_PROFILES).read_text())
    assert len(kept) == 1 and not (tmp_path / "parts" / "profiles.json").exists()

    stop[0] = False
    resumed = runner.run_eval(_config(), data_dir=data, settings=settings, run_dir=tmp_path / "parts", resume=True)
    assert asked[0] >= 2 and asked[1:] == [asked[0] - 1]  # the resumed stage: only the missing profiles
    assert _without_wall_times(resumed) == _without_wall_times(whole)


def test_a_run_is_resumed_only_in_the_dtype_it_was_made_in(tmp_path: Path) -> None:
    """Sessions run on different CPUs (OPPU_DTYPE=auto: bf16 on some, fp32 on others): a resume in another
    dtype stops with what to set, never mixes the two."""
    data = _dataset(tmp_path / "ml")
    first = runner.RunState.open(tmp_path / "run", _config(), data, resume=False)
    first.pin_dtype("bfloat16")
    again = runner.RunState.open(tmp_path / "run", _config(), data, resume=True)
    with pytest.raises(ValueError, match="OPPU_DTYPE=bfloat16"):
        again.pin_dtype("float32")
    again.pin_dtype("bfloat16")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dtype"] == "bfloat16"


def test_the_report_says_whether_the_code_changed_between_sessions() -> None:
    """A run spans sessions and the fingerprint sees only its config: each session records service/'s git tree."""
    here = runner.code_version()
    assert here["commit"] is not None and len(here["commit"]) == 40  # the tests run in a git checkout
    a = {"commit": "1" * 40, "service_tree": "a", "service_modified": False}
    b = {**a, "service_tree": "b"}
    assert runner._code_changed([a, a], sessions=2) is False
    assert runner._code_changed([a, b], sessions=2) is True
    assert runner._code_changed([a], sessions=2) is None  # a session from before the record
    assert runner._code_changed([a, {**a, "service_modified": True}], sessions=2) is None
