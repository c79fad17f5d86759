"""service/inference/tokens.py: a chat template that refuses the turns is the caller's error, named as such."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from service.inference.tokens import ChatTemplateRefused, encode_messages
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
