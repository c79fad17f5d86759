"""Structured output on the REAL default model: for 20 seeded random prompts, /v1/chat/completions with a
json_schema response_format answers JSON that parses and validates against the schema. The 20 are sent at once:
the engine runs them as constrained rows of one batch (and the test takes a fraction of the sequential time)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.shared_params import ResponseFormatJSONSchema

from service.config import DEFAULT_MODEL
from tests.conftest import ADMIN_KEY, running_app

pytestmark = pytest.mark.e2e

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
    },
    "required": ["title", "year", "genres", "rating"],
    "additionalProperties": False,
}
TOPICS = "space pirates dragons cooking robots detectives jazz ocean winter trains ghosts football chess".split()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with running_app(tmp_path_factory.mktemp("json-e2e"), DEFAULT_MODEL, device="cpu") as client:
        yield client


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Invent a movie about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}; describe it." for _ in range(n)]


def test_json_schema_answers_parse_and_validate(app: TestClient, tmp_path: Path) -> None:
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=app, max_retries=0)
    model = oa.models.list().data[0].id
    fmt: ResponseFormatJSONSchema = {"type": "json_schema", "json_schema": {"name": "movie", "schema": SCHEMA}}

    def ask(prompt: str) -> tuple[str, str, str | None]:
        out = oa.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=96,
            temperature=0.7,
            seed=1,
            response_format=fmt,
        )
        return prompt, out.choices[0].message.content or "", out.choices[0].finish_reason

    asked = prompts(20)
    with ThreadPoolExecutor(max_workers=len(asked)) as pool:
        answers = list(pool.map(ask, asked))
    for prompt, text, finish in answers:
        assert finish == "stop", (prompt, text)
        jsonschema.validate(json.loads(text), SCHEMA)
