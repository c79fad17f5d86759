"""Read and write LaMP-format question and output files, and map LaMP profile items to history items.

Owns the file format and its validation only; knows nothing about the server, models or storage.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class LampProfileItem:
    """One profile entry: its id, its other fields as strings, and its optional date."""

    id: str
    fields: dict[str, str] = field(default_factory=dict)
    date: str | None = None


@dataclass(frozen=True)
class LampQuestion:
    id: str
    input: str
    profile: list[LampProfileItem] = field(default_factory=list)


@dataclass(frozen=True)
class LampOutputs:
    task: str
    golds: dict[str, str] = field(default_factory=dict)


def _as_id(value: object, where: str) -> str:
    # LaMP ids are strings, but some derived files carry them as integers.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field 'id' must be a non-empty string, got {value!r}")


def _as_text(value: object, where: str, name: str) -> str:
    # LaMP-3 scores appear both as "5" and 5; numbers are kept as their text.
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field {name!r} must be a string or number, got {type(value).__name__}")


def _require(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    return obj[key]


def _parse_profile_item(raw: object, where: str) -> LampProfileItem:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be an object, got {type(raw).__name__}")
    item_id = _as_id(_require(raw, "id", where), where)
    where = f"{where} (id={item_id!r})"
    date: str | None = None
    if "date" in raw and raw["date"] is not None:
        date = _as_text(raw["date"], where, "date")
    fields = {k: _as_text(v, where, k) for k, v in raw.items() if k not in ("id", "date")}
    return LampProfileItem(id=item_id, fields=fields, date=date)


def _parse_question(raw: object, where: str) -> LampQuestion:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be an object, got {type(raw).__name__}")
    qid = _as_id(_require(raw, "id", where), where)
    where = f"{where} (id={qid!r})"
    text = _require(raw, "input", where)
    if not isinstance(text, str):
        raise ValueError(f"{where}: field 'input' must be a string, got {type(text).__name__}")
    profile = _require(raw, "profile", where)
    if not isinstance(profile, list):
        raise ValueError(f"{where}: field 'profile' must be a list, got {type(profile).__name__}")
    items = [_parse_profile_item(p, f"{where}: profile[{i}]") for i, p in enumerate(profile)]
    return LampQuestion(id=qid, input=text, profile=items)


def _load_json(path: StrPath) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{os.fspath(path)}: not valid JSON: {exc}") from exc


def _dump_json(path: StrPath, data: Any) -> None:
    Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def parse_questions(data: object) -> list[LampQuestion]:
    """Validate an already-decoded questions document."""
    if not isinstance(data, list):
        raise ValueError(f"questions file must be a JSON list, got {type(data).__name__}")
    questions = [_parse_question(q, f"questions[{i}]") for i, q in enumerate(data)]
    seen: set[str] = set()
    for i, q in enumerate(questions):
        if q.id in seen:
            raise ValueError(f"questions[{i}]: duplicate question id {q.id!r}")
        seen.add(q.id)
    return questions


def read_questions(path: StrPath) -> list[LampQuestion]:
    return parse_questions(_load_json(path))


def question_to_json(question: LampQuestion) -> dict[str, Any]:
    profile: list[dict[str, str]] = []
    for item in question.profile:
        entry = {"id": item.id, **item.fields}
        if item.date is not None:
            entry["date"] = item.date
        profile.append(entry)
    return {"id": question.id, "input": question.input, "profile": profile}


def write_questions(path: StrPath, questions: list[LampQuestion]) -> None:
    _dump_json(path, [question_to_json(q) for q in questions])


def parse_outputs(data: object) -> LampOutputs:
    """Validate an already-decoded outputs document."""
    if not isinstance(data, dict):
        raise ValueError(f"outputs file must be a JSON object, got {type(data).__name__}")
    task = _require(data, "task", "outputs")
    if not isinstance(task, str) or not task:
        raise ValueError(f"outputs: field 'task' must be a non-empty string, got {task!r}")
    golds_raw = _require(data, "golds", "outputs")
    if not isinstance(golds_raw, list):
        raise ValueError(f"outputs: field 'golds' must be a list, got {type(golds_raw).__name__}")
    golds: dict[str, str] = {}
    for i, raw in enumerate(golds_raw):
        where = f"golds[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be an object, got {type(raw).__name__}")
        gid = _as_id(_require(raw, "id", where), where)
        where = f"{where} (id={gid!r})"
        if gid in golds:
            raise ValueError(f"{where}: duplicate gold id")
        golds[gid] = _as_text(_require(raw, "output", where), where, "output")
    return LampOutputs(task=task, golds=golds)


def read_outputs(path: StrPath) -> LampOutputs:
    return parse_outputs(_load_json(path))


def write_outputs(path: StrPath, outputs: LampOutputs) -> None:
    golds = [{"id": k, "output": v} for k, v in outputs.golds.items()]
    _dump_json(path, {"task": outputs.task, "golds": golds})


def task_number(task: str) -> int | None:
    """'LaMP_3', 'LaMP-3', 'lamp3' and '3' all give 3; anything else gives None."""
    match = re.fullmatch(r"(?:lamp[_\- ]?)?(\d+)", task.strip().lower())
    return int(match.group(1)) if match else None


def normalize_date(date: str | None) -> str | None:
    """A LaMP date as ISO-8601 UTC, or None when it is absent or not a recognisable date."""
    if not date:
        return None
    text = date.strip()
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:
            parsed = datetime.strptime(text, "%Y%m%d")
        except ValueError:
            return None
    parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    return parsed.isoformat().replace("+00:00", "Z")


def profile_item_to_history(item: LampProfileItem, task: str) -> dict[str, Any]:
    """Map one profile item to the server's history item shape (id, input, output, kind, timestamp).

    LaMP-3 items are (text, score) reviews: input=text, output=score. Other tasks: output is the
    longest field (the user-written text), input the remaining fields joined by newlines.
    """
    if task_number(task) == 3:
        missing = [k for k in ("text", "score") if k not in item.fields]
        if missing:
            raise ValueError(f"profile item {item.id!r}: LaMP-3 item lacks field(s) {missing}")
        text, output, kind = item.fields["text"], item.fields["score"], "rating"
    else:
        if not item.fields:
            raise ValueError(f"profile item {item.id!r}: has no text fields")
        longest = max(item.fields, key=lambda k: len(item.fields[k]))  # first wins on ties
        output = item.fields[longest]
        text = "\n".join(v for k, v in item.fields.items() if k != longest)
        kind = "text"
    return {
        "id": item.id,
        "input": text,
        "output": output,
        "kind": kind,
        "timestamp": normalize_date(item.date),
    }
