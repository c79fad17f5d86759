"""RowText (service/generation/text.py): one row's text as its tokens arrive, on a byte-level fake codec
(one token per UTF-8 byte), so multi-byte characters and stop strings really span tokens."""

from __future__ import annotations

from service.engine.types import TokenEvent, TokenLogprob
from service.generation.text import RowText
from tests.factories import FakeCodec

CODEC = FakeCodec()


def feed(row: RowText, text: str) -> list[str]:
    """Push `text` one byte token at a time; the text each push lets out."""
    return [row.push(TokenEvent(t)) for t in CODEC.ids(text)]


def test_a_multi_byte_character_comes_out_once_it_is_complete() -> None:
    row = RowText(CODEC, ())
    e_acute = CODEC.ids("é")
    assert len(e_acute) == 2  # the fake really splits it
    assert row.push(TokenEvent(e_acute[0])) == ""  # half a character: never a U+FFFD sent to the client
    assert row.push(TokenEvent(e_acute[1])) == "é"
    assert feed(row, "€") == ["", "", "€"]  # three bytes
    assert row.text == "é€"
    assert row.finish() == ""


def test_without_stop_strings_each_character_is_sent_as_soon_as_it_is_decoded() -> None:
    row = RowText(CODEC, ())
    assert feed(row, "abc") == ["a", "b", "c"]
    assert not row.stopped


def test_a_trailing_partial_character_comes_out_at_finish() -> None:
    row = RowText(CODEC, ())
    assert feed(row, "ok") == ["o", "k"]
    assert row.push(TokenEvent(CODEC.ids("é")[0])) == ""
    assert row.finish() == "\ufffd"  # what the tokenizer decodes it to; not dropped silently
    assert row.text == "ok\ufffd"


def test_a_stop_string_across_token_boundaries_cuts_the_text_before_it() -> None:
    row = RowText(CODEC, ("END",))
    sent = feed(row, "abEND")
    # Characters that may start the stop string are held back (len - 1 of them), never sent and retracted.
    assert sent == ["", "", "a", "b", ""]
    assert row.stopped
    assert row.text == "ab"
    assert "".join(sent) + row.finish() == "ab"
    assert [t.token_id for t in row.tokens] == CODEC.ids("ab")  # the stop string's tokens are cut with it


def test_held_back_characters_come_out_at_finish_when_no_stop_string_follows() -> None:
    row = RowText(CODEC, ("END",))
    sent = feed(row, "abEN")
    assert "".join(sent) == "ab"
    assert not row.stopped
    assert row.finish() == "EN"
    assert row.text == "abEN"


def test_the_first_of_several_stop_strings_wins_and_is_never_included() -> None:
    row = RowText(CODEC, ("zz", "\n\n", "b\n"))
    sent = "".join(feed(row, "xab\n\nzz"))
    assert row.stopped
    assert row.text == "xa"  # "b\n" starts before "\n\n" and "zz"
    assert sent + row.finish() == "xa"


def test_a_stop_string_made_of_multi_byte_characters_is_found() -> None:
    row = RowText(CODEC, ("—",))  # an em dash: three byte tokens
    sent = "".join(feed(row, "café — ok"))
    assert row.stopped
    assert sent + row.finish() == "café "
    assert row.text == "café "


def test_token_offsets_are_where_each_token_text_starts_in_the_completion() -> None:
    row = RowText(CODEC, ())
    feed(row, "aé b")
    # é's two tokens both start at character 1; the offsets count characters, not bytes.
    assert [(t.token_id, t.offset) for t in row.tokens] == [
        (ord("a"), 0),
        (0xC3, 1),
        (0xA9, 1),
        (ord(" "), 2),
        (ord("b"), 3),
    ]


def test_logprobs_are_kept_with_each_token() -> None:
    row = RowText(CODEC, ())
    top = (TokenLogprob(ord("x"), -0.1), TokenLogprob(ord("y"), -2.5))
    row.push(TokenEvent(ord("x"), -0.1, top))
    (token,) = row.tokens
    assert (token.logprob, token.top) == (-0.1, top)


def test_take_tokens_gives_the_tokens_of_what_was_sent_once() -> None:
    row = RowText(CODEC, ("END",))
    feed(row, "abc")  # "a" sent, "bc" held back
    assert [t.token_id for t in row.take_tokens()] == [ord("a")]
    assert row.take_tokens() == []  # never twice
    assert row.push(TokenEvent(CODEC.ids("é")[0])) == ""  # half a character: the text did not grow
    assert row.take_tokens() == []
    assert row.push(TokenEvent(CODEC.ids("é")[1])) == "b"
    assert [t.token_id for t in row.take_tokens()] == [ord("b")]
    assert row.finish() == "cé"
    assert [t.token_id for t in row.take_tokens()] == [ord("c"), *CODEC.ids("é")]


def test_take_tokens_never_gives_a_stop_string_token() -> None:
    row = RowText(CODEC, ("END",))
    sent = "".join(feed(row, "abEND"))
    assert sent == "ab"
    assert [t.token_id for t in row.take_tokens()] == CODEC.ids("ab")
    row.finish()
    assert row.take_tokens() == []
