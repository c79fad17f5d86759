"""The MovieLens personalization protocol: which methods are compared, the presets, the splits a run scores
(`build_tasks`, also what a re-read rebuilds), and the leakage checks that every run asserts (no test item in
any stored history, training example or retrieved prompt item).

Pure data and checks; `runner` drives the real components with it, `report` scores what they answered.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from service.evaluation import movielens as ml
from service.history.service import DocSnapshot
from service.training.examples import TrainExample

REFERENCE = "oppu_rag"  # the method every other one is compared with (paired bootstrap), per readout
EV = "_ev"  # suffix of a method's expected-value readout (its greedy readout has the bare name)
MEDIAN = "_median"  # suffix of its median readout (the MAE-optimal point of the scored distribution)
RATINGS = tuple(f"{0.5 * i:.1f}" for i in range(1, 11))  # the answers scored for the expected value
SCOPE = "/"  # stage-1 example ids are "<user>/<item>", so leakage is checked per user


@dataclass(frozen=True)
class LlmMethod:
    name: str
    k: int  # retrieved history items in the prompt
    profile: bool  # the generated profile in the prompt
    adapter: bool  # the user's own LoRA (slot path); every method runs on base + shared LoRA


@dataclass(frozen=True)
class EvalConfig:
    preset: str = "custom"
    users: int = 4
    history_items: int = 12
    test_items: int = 2
    seed: int = 0  # user sampling, LoRA init/shuffling, bootstrap
    model: str | None = None  # None: the served model (OPPU_MODEL, default SmolLM2-135M-Instruct)
    # Users are drawn among those with at least this many ratings (None: history + test items): the same
    # value for every activity level keeps the same users and test items across levels.
    min_ratings: int | None = None
    # Training: None = the server's default (OPPU_TRAIN_*), so the run measures what a user gets.
    shared_epochs: int | None = None
    user_epochs: int | None = None
    shared_lr: float | None = None
    user_lr: float | None = None
    user_min_steps: int | None = None
    shared_batch_size: int | None = None
    user_batch_size: int | None = None
    rank: int | None = None
    alpha: float | None = None
    shared_max_per_user: int = 200  # stage-1 examples drawn from one user (per prompt shape)
    user_train_k: int | None = None  # retrieved items in stage-2 training prompts (None: OPPU_TRAIN_RETRIEVAL_K)
    oppu_rag_k: int = 4  # retrieved items when serving oppu_rag (as rag_k4)
    shared_ks: tuple[int, ...] = (0, 1, 4)  # stage-1 prompt shapes (plus one with the profile)
    max_seq_len: int = 512
    max_new_tokens: int = 6
    profile_items: int = 40  # the most recent history items the profile is generated from
    profile_new_tokens: int = 48
    gen_batch: int = 16  # rows per generation batch (= adapter slots)
    bootstrap_resamples: int = 2000
    # "dev": each user's last test_items ratings are dropped unread and the ones just before are scored,
    # so settings can be chosen on dev and the test items stay untouched until the reported run.
    split: Literal["test", "dev"] = "test"
    # Item context: every item's text carries how many OTHER users rated the movie strictly before its own
    # timestamp, and their mean (movielens.with_item_context); off reproduces the earlier runs.
    item_context: bool = False
    # Stage 1 (the shared task LoRA): "evaluated" trains it on the evaluated users' histories (the earlier
    # runs); "outside" on users OUTSIDE the evaluated set (the paper's protocol), at most shared_users of them
    # (None: every eligible user that is not evaluated).
    shared_pool: str = "evaluated"
    shared_users: int | None = None
    user_train_profile: bool = False  # stage-2 prompts carry the profile (as the server's retrain does)
    # True: min_ratings already counts the dev holdout, so test and dev draw the SAME users.
    eligibility_includes_holdout: bool = False
    # A dev report of the same users: each LLM method's readout is chosen on it (test runs).
    dev_report: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.split not in ("test", "dev"):
            raise ValueError(f"split must be 'test' or 'dev', got {self.split!r}")
        if self.shared_pool not in ("evaluated", "outside"):
            raise ValueError(f"shared_pool must be 'evaluated' or 'outside', got {self.shared_pool!r}")

    @property
    def min_ratings_for_split(self) -> int:
        """The min_ratings passed to build_rating_task (which adds the holdout on top)."""
        need = self.min_ratings or self.history_items + self.test_items
        return need - self.holdout if self.eligibility_includes_holdout else need

    def trained_shape(self, method: LlmMethod, default_k: int) -> bool:
        """Whether `method` serves the user LoRA with the prompt shape it was trained on (k and profile)."""
        k = self.user_train_k if self.user_train_k is not None else default_k
        return method.adapter and method.k == k and method.profile == self.user_train_profile

    @property
    def holdout(self) -> int:
        """Ratings dropped unread from the end of every user's timeline."""
        return self.test_items if self.split == "dev" else 0

    def methods(self) -> tuple[LlmMethod, ...]:
        return (
            LlmMethod("non_personalized", 0, False, False),
            LlmMethod("rag_k1", 1, False, False),
            LlmMethod("rag_k4", 4, False, False),
            LlmMethod("pag", 0, True, False),
            LlmMethod("oppu", 0, False, True),
            LlmMethod(REFERENCE, self.oppu_rag_k, False, True),
            LlmMethod("oppu_pag", 0, True, True),
        )


PRESETS: dict[str, EvalConfig] = {
    # CI: a pipeline check, not a measurement (4 users x 2 test items).
    "small": EvalConfig(preset="small", users=4, history_items=12, test_items=2, user_epochs=1, shared_epochs=1),
    # The first measurement (2026-11): 50 users x 24 history items x 4 test items.
    "full": EvalConfig(
        preset="full", users=50, history_items=24, test_items=4, shared_epochs=1, user_epochs=2, shared_batch_size=16
    ),
    # Activity levels: the same 20 users and 160 test items at --history-items 24, 100 or 200 (users with
    # >= 216 ratings, so that the dev split's holdout fits too). Sized to finish in <= 60 min at 200 items on
    # a 2-core box; stage 1 samples at most 8 items per user and prompt shape.
    "activity": EvalConfig(
        preset="activity", users=20, history_items=100, test_items=8, min_ratings=216, shared_max_per_user=8
    ),
    # Enough users to decide (issue 17): 100 of the 217 users with >= 116 ratings (100 history + 8 dev + 8
    # test; the same users on both splits), stage 1 on the 117 others (the paper's protocol), stage 2 trained
    # with the prompt shape OPPU+RAG is served with (k = 4, no profile). Hours on 2 cores: run it resumable.
    "large": EvalConfig(
        preset="large",
        users=100,
        history_items=100,
        test_items=8,
        min_ratings=116,
        eligibility_includes_holdout=True,
        shared_pool="outside",
        shared_max_per_user=8,
        user_train_k=4,
        oppu_rag_k=4,
        # One row per engine step: the engine's batched numerics depend on the batch's make-up, so only this
        # makes a resumed run (and any rerun) give the same report, bit for bit.
        gen_batch=1,
    ),
}


def preset_config(name: str, **overrides: Any) -> EvalConfig:
    """A preset with overrides; `epochs` sets both stages' epochs."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    epochs = overrides.pop("epochs", None)
    if epochs is not None:
        overrides.update(shared_epochs=epochs, user_epochs=epochs)
    known = {f.name for f in fields(EvalConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}")
    return replace(PRESETS[name], **overrides)


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set field=value` options (e.g. user_lr=3e-3, shared_ks=0,1,4), typed after the EvalConfig field."""
    defaults = EvalConfig()
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in {f.name for f in fields(EvalConfig)} or name in ("preset", "progress"):
            raise ValueError(f"--set expects FIELD=VALUE with an EvalConfig field, got {pair!r}")
        current = getattr(defaults, name)
        try:
            value: Any = _typed(name, current, text)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"--set {name}: cannot read {text!r} as {type(current).__name__}") from exc
        out[name] = value
    return out


_FLOAT_FIELDS = frozenset({"shared_lr", "user_lr", "alpha"})


def _typed(name: str, current: Any, text: str) -> Any:
    """The text of `--set name=text` as the field's type (fields whose default is None: by name)."""
    if isinstance(current, bool):
        return {"true": True, "false": False}[text.lower()]
    if isinstance(current, tuple):
        return tuple(int(v) for v in text.split(",") if v)
    if current is None:
        return float(text) if name in _FLOAT_FIELDS else (text if name in ("model", "dev_report") else int(text))
    if isinstance(current, int | float):
        return type(current)(text)
    return text


def default_data_dir() -> Path:
    """`../shared/data/movielens-latest-small` next to the repository (never copied into it)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens-latest-small"


def outside_splits(data: ml.MovieLens, config: EvalConfig, task: ml.RatingTask) -> list[ml.UserSplit]:
    """Stage-1 users OUTSIDE the evaluated set: eligible by the same rule, split the same way (their scored
    items are never read), at most shared_users of them (seeded)."""
    evaluated = {ml.user_number(s.user_id) for s in task.users}
    need = max(config.min_ratings_for_split, config.test_items + 1) + config.holdout
    others = sorted(u for u, rs in data.ratings.items() if len(rs) >= need and u not in evaluated)
    if config.shared_users is not None:
        others = sorted(random.Random(config.seed + 1).sample(others, min(config.shared_users, len(others))))
    if not others:
        raise ValueError("shared_pool='outside' needs users outside the evaluated set; none is eligible")
    kw = {"history_items": config.history_items, "test_items": config.test_items, "holdout": config.holdout}
    splits = [ml.split_user(data, u, **kw) for u in others]
    return [replace(s, test=[]) for s in splits]


def build_tasks(data: ml.MovieLens, config: EvalConfig) -> tuple[ml.RatingTask, ml.RatingTask, list[ml.UserSplit]]:
    """(the scored task, its dev task for the baselines' choices, the stage-1 users outside the evaluated set)."""
    kw = {
        "n_users": config.users,
        "history_items": config.history_items,
        "test_items": config.test_items,
        "min_ratings": config.min_ratings_for_split,
        "seed": config.seed,
    }
    task = ml.build_rating_task(data, **kw, holdout=config.holdout)
    dev_holdout = config.holdout if config.split == "dev" else config.test_items
    dev_kw = dict(kw)
    if config.eligibility_includes_holdout and config.split == "test":
        dev_kw["min_ratings"] = kw["min_ratings"] - dev_holdout
    dev = task if config.split == "dev" else ml.build_rating_task(data, **dev_kw, holdout=dev_holdout)
    outside = outside_splits(data, config, task) if config.shared_pool == "outside" else []
    if config.item_context:
        task = ml.with_item_context(task, data)
        dev = task if config.split == "dev" else ml.with_item_context(dev, data)
        outside = ml.with_item_context(ml.RatingTask(outside), data).users
    return task, dev, outside


def config_of(report_config: Mapping[str, Any]) -> EvalConfig:
    """The EvalConfig a report (its "config") or a run folder (run.json's "config") was made with. A report
    writes its split as prose and its holdout as a number: the split is read back from the holdout."""
    known = {f.name for f in fields(EvalConfig)}
    values = {k: v for k, v in report_config.items() if k in known and k not in ("split", "progress", "model")}
    if isinstance(values.get("shared_ks"), list):
        values["shared_ks"] = tuple(values["shared_ks"])
    written = report_config.get("split")
    split: Literal["test", "dev"] = "dev" if int(report_config.get("holdout", 0)) > 0 else "test"
    if written in ("dev", "test"):
        split = "dev" if written == "dev" else "test"
    return EvalConfig(**values, split=split)


def scored_rows(task: ml.RatingTask) -> list[tuple[str, str, float]]:
    """(user, item, gold) of every scored item of `task`, in task order: what a report's prediction rows hold."""
    return [(s.user_id, t.item_id, t.rating) for s in task.users for t in s.test]


def report_rows(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, float]]:
    return [(str(r["user"]), str(r["item"]), float(r["gold"])) for r in rows]


def check_dev_report(dev: Mapping[str, Any], dev_task: ml.RatingTask, *, name: str = "the dev report") -> None:
    """The one rule for a dev report that a test run or a re-read chooses readouts on (raise ValueError): a dev
    run (holdout > 0; a test-split report never is one) that scored exactly the dev split of the run being
    read: the same users and, item by item, the same ratings (so the same seed, test_items and holdout)."""
    if int(dev.get("config", {}).get("holdout", 0)) <= 0:
        raise ValueError(f"{name}: a test-split report (holdout 0), not a dev report; nothing is chosen on test")
    users = sorted({str(r["user"]) for r in dev["predictions"]})
    if users != sorted(s.user_id for s in dev_task.users):
        raise ValueError(f"{name}: not a dev report of this run's users")
    if report_rows(dev["predictions"]) != scored_rows(dev_task):
        raise ValueError(f"{name}: its scored items are not this run's dev split (another seed, test_items?)")


# --- leakage checks (raise AssertionError) ---


def test_ids(task: ml.RatingTask) -> dict[str, set[str]]:
    return {split.user_id: {t.item_id for t in split.test} for split in task.users}


def check_history_leakage(task: ml.RatingTask, stored: Mapping[str, Sequence[DocSnapshot]]) -> int:
    """The histories read back from SQL hold exactly each user's history items, never a test item."""
    ml.check_no_leakage(task)
    tests = test_ids(task)
    for split in task.users:
        ids = [d.id for d in stored.get(split.user_id, [])]
        leaked = sorted(set(ids) & tests[split.user_id])
        if leaked:
            raise AssertionError(f"{split.user_id}: test items stored in history: {leaked}")
        if ids != [h.item_id for h in split.history]:
            raise AssertionError(f"{split.user_id}: stored history differs from the split's history")
    return sum(len(v) for v in stored.values())


def check_example_leakage(task: ml.RatingTask, examples: Mapping[str, Sequence[TrainExample]]) -> int:
    """Every training example of a user comes from that user's history and is none of their test items."""
    tests = test_ids(task)
    histories = {split.user_id: {h.item_id for h in split.history} for split in task.users}
    for user, exs in examples.items():
        if user not in tests:
            raise AssertionError(f"training examples for unknown user {user!r}")
        for ex in exs:
            if ex.item_id in tests[user]:
                raise AssertionError(f"{user}: test item {ex.item_id} is a training example")
            if ex.item_id not in histories[user]:
                raise AssertionError(f"{user}: training example {ex.item_id} is not in the history")
    return sum(len(v) for v in examples.values())


def check_retrieved_leakage(user: str, task_tests: Mapping[str, set[str]], retrieved_ids: Iterable[str]) -> None:
    leaked = sorted(set(retrieved_ids) & task_tests[user])
    if leaked:
        raise AssertionError(f"{user}: test items retrieved into a prompt: {leaked}")


def unscope(examples: Sequence[TrainExample]) -> dict[str, list[TrainExample]]:
    out: dict[str, list[TrainExample]] = {}
    for ex in examples:
        user, sep, item = ex.item_id.partition(SCOPE)
        if not sep:
            raise AssertionError(f"stage-1 example {ex.item_id!r} has no user scope")
        out.setdefault(user, []).append(replace(ex, item_id=item))
    return out
