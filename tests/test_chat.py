"""Assistant-only labels: exact on hand-built conversations."""

from __future__ import annotations

import pytest

from salsa_lightning.data.chat import IGNORE_INDEX, tokenize_conversation
from salsa_lightning.errors import SalsaError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "It is 8."},
]


def labelled_text(tokenizer, enc) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    runs, current = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_assistant_turns_are_labelled(tiny_tokenizer):
    enc = tokenize_conversation(tiny_tokenizer, CONVERSATION, max_length=1024)
    # exactly the two assistant contents plus their end-of-turn marker (so the model learns to stop)
    assert labelled_text(tiny_tokenizer, enc) == ["The answer is 5.<|im_end|>\n", "It is 8.<|im_end|>\n"]
    # and everything else, the template's role headers included, is ignored
    full = tiny_tokenizer.decode(enc["input_ids"])
    assert full == tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_truncation_keeps_alignment(tiny_tokenizer):
    full = tokenize_conversation(tiny_tokenizer, CONVERSATION, max_length=1024)
    short = tokenize_conversation(tiny_tokenizer, CONVERSATION, max_length=20)
    assert short["input_ids"] == full["input_ids"][:20]
    assert short["labels"] == full["labels"][:20]


def test_template_that_rewrites_history_is_refused(tiny_tokenizer):
    import copy

    bad = copy.deepcopy(tiny_tokenizer)
    # a template that renders the number of messages first: prefixes are not prefixes of the whole
    bad.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(SalsaError, match="prefixes"):
        tokenize_conversation(bad, CONVERSATION, max_length=1024)
