import json
from pathlib import Path

import pytest

from service.evaluation.lamp import (
    LampOutputs,
    LampProfileItem,
    LampQuestion,
    normalize_date,
    profile_item_to_history,
    read_outputs,
    read_questions,
    task_number,
    write_outputs,
    write_questions,
)

QUESTIONS = [
    {
        "id": "310",
        "input": "What is the score of this review? review: great film",
        "profile": [
            {"id": "3100", "text": "loved it", "score": "5"},
            {"id": "3101", "text": "meh", "score": 2, "date": "2015-11-10"},
        ],
    },
    {"id": "311", "input": "second", "profile": []},
]


def test_read_questions_parses_fields_and_dates(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(QUESTIONS))
    qs = read_questions(path)
    assert [q.id for q in qs] == ["310", "311"]
    assert qs[0].profile[0] == LampProfileItem("3100", {"text": "loved it", "score": "5"}, None)
    assert qs[0].profile[1] == LampProfileItem("3101", {"text": "meh", "score": "2"}, "2015-11-10")
    assert qs[1].profile == []


def test_questions_round_trip(tmp_path: Path) -> None:
    qs = [
        LampQuestion("a", "in ü", [LampProfileItem("p1", {"title": "t", "abstract": "long"}, "20200101")]),
        LampQuestion("b", "x", []),
    ]
    write_questions(tmp_path / "q.json", qs)
    assert read_questions(tmp_path / "q.json") == qs
    write_questions(tmp_path / "q2.json", read_questions(tmp_path / "q.json"))
    assert (tmp_path / "q.json").read_text() == (tmp_path / "q2.json").read_text()


def test_outputs_round_trip(tmp_path: Path) -> None:
    out = LampOutputs("LaMP_3", {"310": "4", "311": "1"})
    write_outputs(tmp_path / "o.json", out)
    assert json.loads((tmp_path / "o.json").read_text()) == {
        "task": "LaMP_3",
        "golds": [{"id": "310", "output": "4"}, {"id": "311", "output": "1"}],
    }
    assert read_outputs(tmp_path / "o.json") == out


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"id": "1"}, "must be a JSON list"),
        ([{"input": "x", "profile": []}], r"questions\[0\]: missing field 'id'"),
        ([{"id": "1", "profile": []}], r"questions\[0\] \(id='1'\): missing field 'input'"),
        ([{"id": "1", "input": "x", "profile": {}}], "'profile' must be a list"),
        ([{"id": "1", "input": 3, "profile": []}], "'input' must be a string"),
        ([{"id": "1", "input": "x", "profile": [{"text": "t"}]}], r"profile\[0\]: missing field 'id'"),
        (
            [{"id": "1", "input": "x", "profile": [{"id": "p", "text": ["t"]}]}],
            r"profile\[0\] \(id='p'\): field 'text' must be a string or number",
        ),
        ([{"id": "1", "input": "x", "profile": []}] * 2, "duplicate question id '1'"),
    ],
)
def test_read_questions_rejects_bad_structure(tmp_path: Path, doc: object, message: str) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        read_questions(path)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a JSON object"),
        ({"golds": []}, "missing field 'task'"),
        ({"task": "LaMP_3"}, "missing field 'golds'"),
        ({"task": "LaMP_3", "golds": [{"id": "1"}]}, r"golds\[0\] \(id='1'\): missing field 'output'"),
        ({"task": "LaMP_3", "golds": [{"id": "1", "output": "2"}] * 2}, "duplicate gold id"),
    ],
)
def test_read_outputs_rejects_bad_structure(tmp_path: Path, doc: object, message: str) -> None:
    path = tmp_path / "o.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        read_outputs(path)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_outputs(path)


def test_lamp3_profile_item_to_history() -> None:
    item = LampProfileItem("3101", {"text": "meh", "score": "2"}, "2015-11-10")
    assert profile_item_to_history(item, "LaMP_3") == {
        "id": "3101",
        "input": "meh",
        "output": "2",
        "kind": "rating",
        "timestamp": "2015-11-10T00:00:00Z",
    }
    with pytest.raises(ValueError, match="lacks field"):
        profile_item_to_history(LampProfileItem("x", {"text": "t"}), "LaMP-3")


def test_generic_profile_item_uses_longest_field_as_output() -> None:
    item = LampProfileItem("p", {"title": "A title", "abstract": "A much longer abstract", "venue": "X"})
    hist = profile_item_to_history(item, "LaMP_5")
    assert hist["output"] == "A much longer abstract"
    assert hist["input"] == "A title\nX"
    assert hist["kind"] == "text"
    assert hist["timestamp"] is None


def test_task_number_and_dates() -> None:
    assert [task_number(t) for t in ("LaMP_3", "LaMP-3", "lamp3", "3", "other")] == [3, 3, 3, 3, None]
    assert normalize_date("20200102") == "2020-01-02T00:00:00Z"
    assert normalize_date("2020-01-02T03:04:05+02:00") == "2020-01-02T01:04:05Z"
    assert normalize_date("yesterday") is None
    assert normalize_date(None) is None
