"""service/inference/tokens.py: a chat template that refuses the turns is the caller's error, named as such; token
ids -> text (streamed deltas equal to one decode, at linear cost) and each token's own bytes."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from service.inference.tokens import ChatTemplateRefused, PromptCodec, TextStream, encode_messages
from tests.models import smollm_tokenizer_dir

# A template that, like Gemma's or Mistral's, has no system role and says so through raise_exception.
NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
)


def test_a_template_refusing_the_turns_raises_chat_template_refused_with_its_message() -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir())
    tokenizer.chat_template = NO_SYSTEM_ROLE
    assert encode_messages(tokenizer, [{"role": "user", "content": "hi"}])  # what it accepts still encodes
    with pytest.raises(ChatTemplateRefused, match="System role not supported"):
        encode_messages(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])


# --- token ids -> text, on the real tokenizer: incremental deltas and each token's own bytes ---

EMOJI_HEAD = 10813  # "ðŁ": the bytes F0 9F, the start of many emoji


class _Config:
    vocab_size = 0
    eos_token_id = None


class CountingCodec(PromptCodec):
    """The real codec, counting the token ids it decodes (the cost of streaming a row's text)."""

    decoded = 0

    def decode(self, token_ids: list[int]) -> str:
        self.decoded += len(token_ids)
        return super().decode(token_ids)


@pytest.fixture(scope="module")
def codec() -> CountingCodec:
    return CountingCodec(AutoTokenizer.from_pretrained(smollm_tokenizer_dir()), _Config())


def stream_all(codec: PromptCodec, ids: list[int]) -> TextStream:
    stream = TextStream(codec)
    deltas = [stream.push(i) for i in ids]
    deltas.append(stream.flush())
    assert "".join(deltas) == stream.text
    return stream


def test_streamed_text_is_the_whole_decode_for_random_tokens(codec: CountingCodec) -> None:
    tokenizer = codec.tokenizer
    single_bytes = tokenizer.convert_tokens_to_ids(list("ðŁĺĬĠ"))  # byte pieces of 😊 and a space
    words = tokenizer("héllo 😊 wörld 日本語 🎉—", add_special_tokens=False)["input_ids"]
    pool = [*single_bytes, *words, EMOJI_HEAD, 0, 1, 2, 3, 216]
    rng = random.Random(7)
    for _ in range(1500):
        n = rng.randrange(60)
        ids = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(len(tokenizer)) for _ in range(n)]
        if rng.random() < 0.1:  # long runs that never complete a character, or decode to nothing
            ids += [rng.choice([EMOJI_HEAD, 2, single_bytes[0]])] * rng.randrange(40)
        stream = stream_all(codec, ids)
        assert stream.text == codec.decode(ids), ids
        assert len(stream.offsets) == len(ids) and stream.offsets == sorted(stream.offsets)


def test_a_character_split_over_tokens_is_sent_once_complete_and_starts_where_its_first_byte_is(
    codec: CountingCodec,
) -> None:
    ids = codec.encode_continuation("a😊b")
    assert len(ids) > 3  # the emoji really spans tokens
    stream = TextStream(codec)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == "a😊b" and "\ufffd" not in "".join(deltas)
    assert stream.offsets == [0] + [1] * (len(ids) - 2) + [2]
    forced = stream_all(codec, [EMOJI_HEAD] * 4)  # cut-off characters: each its own U+FFFD, one after another
    assert (forced.text, forced.offsets) == ("\ufffd" * 4, [0, 1, 2, 3])


def test_streaming_decodes_a_short_window_not_every_token_so_far(codec: CountingCodec) -> None:
    ids = codec.encode_continuation("The quick brown fox jumps 😊 over the lazy dog. " * 60)
    for run in (ids, [EMOJI_HEAD] * 1000, [2] * 1000):
        codec.decoded = 0
        stream_all(codec, run)
        assert codec.decoded < 40 * len(run)  # linear: decoding everything each time would be ~len(run)**2 / 2


def test_token_bytes_are_the_vocabulary_bytes_and_token_text_escapes_a_partial_character(
    codec: CountingCodec,
) -> None:
    assert codec.token_bytes(EMOJI_HEAD) == b"\xf0\x9f"
    assert codec.token_text(EMOJI_HEAD) == "\\xf0\\x9f"  # as OpenAI shows such a token
    assert (codec.token_bytes(2), codec.token_text(2)) == (b"<|im_end|>", "<|im_end|>")  # special: its text
    text = "héllo 😊 日本語"
    assert b"".join(codec.token_bytes(i) for i in codec.encode_continuation(text)) == text.encode()
    partial = 0
    for i in range(len(codec.tokenizer)):  # every token that is whole characters: its bytes are its text
        try:
            own = codec.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
            continue
        assert own == codec.token_text(i) == codec.tokenizer.decode([i])
    assert partial > 100  # byte-level BPE has many tokens that are parts of characters
