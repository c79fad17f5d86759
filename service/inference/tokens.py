"""Prompt text -> token ids, the same way for serving and training (chat template when present)."""

from __future__ import annotations

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

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included), as logprobs show it."""
        return str(self.tokenizer.decode([token_id]))


class TextStream:
    """Turns a growing list of token ids into text deltas; holds back an incomplete multi-byte character."""

    def __init__(self, codec: PromptCodec) -> None:
        self._codec = codec
        self.token_ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self._codec.decode(self.token_ids)
        if text.endswith("\ufffd") or len(text) <= len(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        text = self._codec.decode(self.token_ids)
        delta = text[len(self.text) :] if len(text) > len(self.text) else ""
        self.text = text if delta else self.text
        return delta
