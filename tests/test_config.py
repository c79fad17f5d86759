"""Settings (service/config.py): every size and duration has a bound, a value outside it stops start-up with a
message naming the environment variable, and the command line says so without a traceback or the value."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import annotated_types
import pytest
from pydantic import ValidationError

from service.config import MAX_N, Settings, describe_invalid

# Numbers whose every value is meaningful (a seed).
UNBOUNDED = {"train_seed"}


def _is_number(annotation: object) -> bool:
    if annotation in (int, float):
        return True
    return isinstance(annotation, types.UnionType) and any(a in (int, float) for a in annotation.__args__)


def test_every_numeric_setting_has_a_lower_bound() -> None:
    unbounded = [
        name
        for name, field in Settings.model_fields.items()
        if _is_number(field.annotation)
        and name not in UNBOUNDED
        and not any(isinstance(m, (annotated_types.Ge, annotated_types.Gt)) for m in field.metadata)
    ]
    assert unbounded == []


def test_the_defaults_are_within_their_bounds() -> None:
    Settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPPU_BATCH_MAX_SIZE", "0"),
        ("OPPU_MAX_BODY_BYTES", "-1"),
        ("OPPU_REQUEST_TIMEOUT_S", "0"),
        ("OPPU_TORCH_THREADS", "0"),
        ("OPPU_VLLM_GPU_MEMORY_UTILIZATION", "1.5"),
        ("OPPU_TRAIN_USER_LR", "0"),
        ("OPPU_TRAIN_BATCH_SIZE", "0"),
        ("OPPU_TRAIN_USER_TARGET_MODULES", "[]"),
        ("OPPU_RETRAIN_AFTER_NEW_ITEMS", "0"),
    ],
)
def test_a_value_out_of_bounds_is_named_by_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert f"  {variable}: " in describe_invalid(exc.value)


@pytest.mark.parametrize(("per_user", "total"), [(MAX_N - 1, 256), (32, 31)])
def test_a_queue_that_can_never_hold_a_request_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, per_user: int, total: int
) -> None:
    """A per-user share below n (up to MAX_N rows, queued at once) answered such requests 429 with Retry-After:
    1 for ever, and SDKs retried them."""
    monkeypatch.setenv("OPPU_QUEUE_PER_USER_MAX", str(per_user))
    monkeypatch.setenv("OPPU_QUEUE_MAX", str(total))
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert f"need {MAX_N} <= queue_per_user_max <= queue_max" in describe_invalid(exc.value)


def test_a_rule_between_settings_is_described_without_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPPU_MAX_BATCH_TOKENS", "4")  # below batch_max_size (16)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert "max_batch_tokens must be >= batch_max_size" in describe_invalid(exc.value)


def test_the_command_line_names_the_variable_without_a_traceback_or_the_value(tmp_path: Path) -> None:
    env = {**os.environ, "OPPU_DATA_DIR": str(tmp_path / "data"), "OPPU_QUEUE_MAX": "s3cret-looking-value"}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "invalid settings:" in done.stderr and "OPPU_QUEUE_MAX: " in done.stderr
    assert "Traceback" not in done.stderr and "s3cret-looking-value" not in done.stderr + done.stdout
    assert not (tmp_path / "data").exists()  # nothing was started or created


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"train_user_rank": 8, "adapter_max_rank": 4}, "above adapter_max_rank"),
        ({"adapter_target_modules": ["q_proj", "v_proj"]}, "not in adapter_target_modules"),
        ({"train_user_alpha": 4096.0}, "above adapter_max_scale"),
        ({"engine": "vllm", "vllm_max_lora_rank": 8}, "vllm_max_lora_rank"),
        ({"max_model_len": 48}, "max_model_len must be above default_max_new_tokens"),
        ({"notice_keep_s": 30.0}, "notice_keep_s must be >= notice_poll_s"),
        ({"prepare_per_user_max": 7}, r"prepare_per_user_max \+ history_writes_per_user_max must be <= 7"),  # SQLite
        ({"prepare_per_user_max": 15, "database_url": "postgresql://h/db"}, "_per_user_max must be <= 15"),
    ],
)
def test_settings_that_every_retrain_or_request_would_fail_on_are_refused_at_start(
    changes: dict[str, object], says: str
) -> None:
    # Each was accepted: every retrain then trained in full, was refused at publish and retried; or every
    # request without max_new_tokens was 422.
    with pytest.raises(ValidationError, match=says):
        Settings(**changes)  # type: ignore[arg-type]
    Settings(train_user_rank=8, adapter_max_rank=8)  # at the limit: fine
    Settings(prepare_per_user_max=6)
    Settings(prepare_per_user_max=14, database_url="postgresql://h/db")


def test_every_setting_is_in_the_readmes_settings_table() -> None:
    # Seven were missing (OPPU_TORCH_THREADS, OPPU_TRAIN_BATCH_SIZE, ...): a table row names a variable whole
    # (`OPPU_X`) or as a suffix of the one before it in the cell (`OPPU_TRAIN_USER_EPOCHS` / `_LR`).
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text[text.index("## Settings") : text.index("## Layout")]
    documented: set[str] = set()
    for line in table.splitlines():
        if not line.startswith("| `OPPU_"):
            continue
        stem = ""
        for token in re.findall(r"`([A-Z0-9_]+)`", line.split("|")[1]):
            if token.startswith("OPPU_"):
                stem = token[5:].lower()
                documented.add(stem)
                continue
            parts = stem.split("_")
            documented |= {"_".join(parts[:i]) + token.lower() for i in range(len(parts), 0, -1)}
    assert sorted(set(Settings.model_fields) - documented) == []


def test_a_malformed_inline_master_key_is_refused_at_start_without_quoting_it() -> None:
    import base64

    for bad in ("not-base64!!", base64.b64encode(b"short").decode()):
        with pytest.raises(ValidationError) as info:
            Settings(master_key=bad)
        assert "not a master key" in describe_invalid(info.value) and bad not in describe_invalid(info.value)
    Settings(master_key=base64.b64encode(os.urandom(32)).decode())


def test_a_keyring_inside_the_database_is_refused_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # OPPU_KEYRING_URL equal to OPPU_DATABASE_URL was accepted: the data keys then sit in every backup of the
    # database, and an erase no longer reaches those backups (crypto-shredding needs the keyring apart).
    db = tmp_path / "db.sqlite3"
    same_database = [
        {"database_url": f"sqlite:///{db}", "keyring_url": f"sqlite:///{db}"},
        {"database_url": f"sqlite:///{db}", "keyring_url": f"sqlite:///{tmp_path}/data/../db.sqlite3?timeout=5"},
        # the database's default file in OPPU_DATA_DIR, named through the data dir and a symlink to it
        {"data_dir": tmp_path / "data", "keyring_url": f"sqlite:///{tmp_path / 'data' / 'oppu.sqlite3'}"},
        {"data_dir": tmp_path / "data", "keyring_url": f"sqlite:///{tmp_path / 'link' / 'oppu.sqlite3'}"},
        # PostgreSQL: one host, port and database (another schema or user is still inside its dumps)
        {"database_url": "postgresql://app@db.example/oppu", "keyring_url": "postgresql://app@db.example/oppu"},
        {
            "database_url": "postgresql+psycopg://app:pw@DB.example:5432/oppu",
            "keyring_url": "postgresql://keys:hunter2@db.example/oppu?options=-csearch_path%3Dkeyring",
        },
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    for values in same_database:
        with pytest.raises(ValidationError) as info:
            Settings(**values)  # type: ignore[arg-type]
        said = describe_invalid(info.value)
        assert "OPPU_KEYRING_URL" in said and "hunter2" not in said and "db.example" not in said, said
    monkeypatch.chdir(tmp_path)  # relative paths: the working directory
    with pytest.raises(ValidationError, match="OPPU_KEYRING_URL"):
        Settings(data_dir=Path("data"), keyring_url="sqlite:///data/oppu.sqlite3")
    apart = [
        {"database_url": f"sqlite:///{db}", "keyring_url": f"sqlite:///{tmp_path / 'keyring.sqlite3'}"},
        {"data_dir": tmp_path / "data"},  # the defaults: two files in the data dir
        {"database_url": "postgresql://app@db.example/oppu", "keyring_url": "postgresql://app@db.example/keyring"},
        {"database_url": "postgresql://app@db.example/oppu", "keyring_url": "postgresql://app@db.example:5433/oppu"},
        {"database_url": "postgresql://app@db.example/oppu", "keyring_url": "postgresql://app@keys.example/oppu"},
        {"database_url": "postgresql://app@db.example/oppu", "keyring_url": f"sqlite:///{tmp_path / 'k.sqlite3'}"},
    ]
    for values in apart:
        Settings(**values)  # type: ignore[arg-type]
