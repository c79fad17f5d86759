"""The one prompt builder: exact formats, clipping, and what is left out."""

from __future__ import annotations

from dataclasses import dataclass

from service.prompts import (
    CONTINUATION_PROMPT,
    build_profile_prompt,
    build_prompt,
    format_item,
    training_request,
)


@dataclass(frozen=True)
class Item:
    output: str
    input: str | None = None
    kind: str | None = None


def test_bare_request_without_context() -> None:
    assert build_prompt("What should I watch?") == "What should I watch?"
    assert build_prompt("q", [], None) == "q"
    assert build_prompt("q", [], "   \n ") == "q"  # a blank profile is no profile


def test_full_prompt_format() -> None:
    items = [Item("Loved it, 5 stars", input="The Matrix", kind="review"), Item("Dune is great")]
    prompt = build_prompt("Rate Inception", items, "Sci-fi fan.")
    assert prompt == (
        "Here are some of this user's past items:\n"
        "- [review] The Matrix -> Loved it, 5 stars\n"
        "- Dune is great\n"
        "\n"
        "This user's profile: Sci-fi fan.\n"
        "\n"
        "Now answer as this user would.\n"
        "Rate Inception"
    )


def test_items_only_and_profile_only() -> None:
    items_only = "Here are some of this user's past items:\n- o\n\nNow answer as this user would.\nr"
    assert build_prompt("r", [Item("o")]) == items_only
    assert build_prompt("r", (), "p") == "This user's profile: p\n\nNow answer as this user would.\nr"


def test_items_keep_the_given_order() -> None:
    prompt = build_prompt("r", [Item("first"), Item("second"), Item("third")])
    assert prompt.index("first") < prompt.index("second") < prompt.index("third")


def test_clipping_and_whitespace() -> None:
    assert format_item(Item("a   b\n\tc"), 100) == "- a b c"
    clipped = format_item(Item("x" * 50), 20)
    assert clipped == "- " + "x" * 17 + "..."
    # With an input, each half gets half the budget.
    both = format_item(Item("o" * 30, input="i" * 30), 20)
    assert both == "- " + "i" * 7 + "... -> " + "o" * 7 + "..."
    assert format_item(Item("short", input="in", kind="tag"), 600) == "- [tag] in -> short"
    long_profile = build_prompt("r", (), "p" * 100, profile_chars=10)
    assert "This user's profile: ppppppp...\n" in long_profile
    assert build_prompt("r", [Item("y" * 1000)], item_chars=10).count("y") == 7


def test_request_is_never_clipped() -> None:
    request = "z" * 5000
    assert build_prompt(request, [Item("o")], "p", item_chars=10, profile_chars=10).endswith(request)


def test_training_request_and_profile_prompt() -> None:
    assert training_request(Item("out", input="the question")) == "the question"
    assert training_request(Item("out")) == CONTINUATION_PROMPT
    assert training_request(Item("out", input="")) == CONTINUATION_PROMPT
    prompt = build_profile_prompt([Item("likes tea"), Item("x" * 1000, input="q")], item_chars=20)
    assert "- likes tea\n" in prompt and prompt.endswith("\n\nProfile:")
    assert "x" * 8 not in prompt
