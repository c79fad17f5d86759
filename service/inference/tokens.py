"""Prompt text -> token ids, the same way for serving and training (chat template when present); token ids ->
text, incrementally for streams, and a token's own bytes for logprobs."""

from __future__ import annotations

import functools
import re
from typing import Any


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a single-turn user prompt, ending where the assistant's answer starts."""
    return encode_messages(tokenizer, [{"role": "user", "content": text}])


class ChatTemplateRefused(ValueError):
    """The model's chat template refused the turns (its own `raise_exception`, e.g. roles that must alternate
    or no system role): the caller's messages, not a server fault."""


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat (system/user/assistant turns), ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as exc:
            raise ChatTemplateRefused(f"the model's chat template refused these messages: {exc}") from exc
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return [int(i) for i in tokenizer(text)["input_ids"]]


def stop_token_ids(tokenizer: Any, model_config: Any) -> frozenset[int]:
    """Every token that ends an assistant turn: eos ids from config/tokenizer plus a chat end marker."""
    ids: set[int] = set()
    for source in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(i) for i in source)
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return frozenset(ids)


def encode_target(tokenizer: Any, text: str, stop_ids: frozenset[int]) -> list[int]:
    """Token ids of an assistant answer as training labels: the text then one stop token."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not (isinstance(end, int) and end in stop_ids):
        end = min(stop_ids) if stop_ids else tokenizer.eos_token_id
    return [*ids, int(end)]


class PromptCodec:
    """The served tokenizer: chat turns or raw text -> token ids, token ids -> text, and the stop tokens."""

    def __init__(self, tokenizer: Any, model_config: Any) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, model_config)
        self.vocab_size = int(getattr(model_config, "vocab_size", 0) or len(tokenizer))
        self._byte_level = _is_byte_level(tokenizer)
        self._bytes: dict[int, bytes] = {}  # token_bytes, filled as logprobs name tokens

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_messages(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        """A raw completion prompt, as the tokenizer encodes it (special tokens such as BOS included)."""
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of a text that follows an encoded prompt (an answer to score): no special tokens added."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (special tokens: their text's UTF-8). A byte-level BPE token may hold part of a
        character, which its decoded text would show as U+FFFD."""
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = _token_bytes(self.tokenizer, token_id, self._byte_level)
        return cached

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included), as logprobs show it: bytes that are not UTF-8 on their own
        as `\\xNN` escapes (as OpenAI shows them), so that different partial-character tokens stay distinct."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted (the stand-in character -> its byte): printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def _is_byte_level(tokenizer: Any) -> bool:
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte tokens


def _token_bytes(tokenizer: Any, token_id: int, byte_level: bool) -> bytes:
    """As the tokenizer's decoder joins it: a byte-level token maps its characters back to bytes (a token with a
    character outside the alphabet, such as an added token, is its text's UTF-8, as the ByteLevel decoder does)."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    if added is not None:
        return str(added.content).encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:  # an id past the tokenizer's vocabulary (a model's padded embedding rows)
        return b""
    table = _byte_decoder()
    if byte_level and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if match := _BYTE_FALLBACK.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    return str(tokenizer.decode([token_id])).encode("utf-8")


class TextStream:
    """Turns a growing list of token ids into text deltas, decoding only a window of the last tokens (as vLLM's
    incremental detokenizer): the window starts at a token whose text is final (`_prefix`), its text up to
    `_read` was sent, and the rest is sent once it no longer ends in U+FFFD (an incomplete character). The deltas
    join to the text of decoding every token at once, for decoders that join tokens' text (byte-level BPE).
    `offsets[i]`: where token i's text starts in `text`, once its text is out (a token holding the rest of a
    character starts at that character)."""

    HELD_MAX = 8  # tokens held for one incomplete character (at most 3 bytes; skipped special tokens between)
    WINDOW_MAX = 32  # tokens in the window: text-less tokens (skipped special tokens) must not grow it forever

    def __init__(self, codec: PromptCodec) -> None:
        self._codec = codec
        self.token_ids: list[int] = []
        self.offsets: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""  # decode(token_ids[_prefix:_read])

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        window = self._codec.decode(self.token_ids[self._prefix :])
        if not window.endswith("\ufffd") and len(window) >= len(self._prefix_text):
            return self._resolve(len(self.token_ids), window)
        if len(self.token_ids) - self._read > self.HELD_MAX:
            return self._resolve_stable(window)
        return ""

    def flush(self) -> str:
        """The last call: every token's text, a trailing incomplete character as U+FFFD."""
        if self._read == len(self.token_ids):
            return ""
        return self._resolve(len(self.token_ids), self._codec.decode(self.token_ids[self._prefix :]))

    def _resolve_stable(self, window: str) -> str:
        """Many tokens end in U+FFFD (a client forcing partial characters): all but the last U+FFFD is final, so
        send the text up to the last token boundary that splits no character, which keeps the window short."""
        ids, stable = self.token_ids, window[:-1]
        for end in range(len(ids) - 1, max(self._read, len(ids) - 5), -1):
            text = self._codec.decode(ids[self._prefix : end])
            clean = stable.startswith(text) and text + self._codec.decode(ids[end:]) == window
            if clean and len(text) > len(self._prefix_text):
                return self._resolve(end, text)
        return ""

    def _resolve(self, end: int, window: str) -> str:
        """Tokens up to `end` have their text (`window`, the window's text up to them): send what is new."""
        delta = window[len(self._prefix_text) :]
        base = len(self.text)
        for i in range(self._read, end):
            if i == self._read or not delta:
                self.offsets.append(base)
            else:  # a later token of a character completed by several: where its own text starts
                before = self._codec.decode(self.token_ids[self._prefix : i])[len(self._prefix_text) :]
                self.offsets.append(base + _common_prefix(before, delta))
        read, self._read, self.text = self._read, end, self.text + delta
        if delta or end - self._prefix > self.WINDOW_MAX:
            self._prefix = read
            self._prefix_text = self._codec.decode(self.token_ids[read:end])
        else:  # only text-less tokens: the window keeps its first token (e.g. a space it would otherwise strip)
            self._prefix_text = window
        return delta


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
