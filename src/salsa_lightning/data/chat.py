"""Conversations (`Messages`) and their chat-template tokenisation: whole conversations for rewards (left-truncated),
labels on assistant tokens only for SFT.

The assistant labels are written by hand because most chat templates (SmolLM2's, Llama-2's, Mistral's) lack the
`{% generation %}` markers that `apply_chat_template(return_assistant_tokens_mask=True)` needs. We
render the conversation prefix by prefix, take each assistant turn's character span, and map spans
to tokens through the fast tokenizer's offsets — exact even when BPE merges across a turn boundary.
"""

from __future__ import annotations

from typing import Any

from salsa_lightning.errors import SalsaError

IGNORE_INDEX = -100
Messages = list[dict[str, str]]


def as_messages(prompt: str | Messages) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def conversation(prompt: str | Messages, response: str | Messages) -> Messages:
    """The full conversation for one side of a pair."""
    if isinstance(response, str):
        return [*as_messages(prompt), {"role": "assistant", "content": response}]
    response = list(response)
    if response and response[0].get("role") != "assistant":
        return response  # already the whole conversation (ultrafeedback_binarized)
    return [*as_messages(prompt), *response]


def last_assistant_text(side: str | Messages) -> str:
    if isinstance(side, str):
        return side
    return next((m["content"] for m in reversed(side) if m.get("role") == "assistant"), "")


def encode_left_truncated(tokenizer, messages: Messages, max_length: int) -> tuple[list[int], bool]:
    """The rendered conversation's token ids, cut from the LEFT to `max_length` (the response end, where a reward
    is read, survives), and whether it was cut."""
    ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans (start, end) of each assistant turn, end-of-turn
    marker included, so the model learns to stop."""
    text = render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise SalsaError(
                "The tokenizer's chat template renders a conversation differently from its prefixes, so assistant "
                "tokens cannot be located; use a template that renders turns append-only (e.g. ChatML)."
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_length: int) -> dict[str, Any]:
    """`input_ids` and `labels` (IGNORE_INDEX outside assistant turns), truncated to `max_length` tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise SalsaError("Assistant-only labels need a fast tokenizer (offset mappings); load it with use_fast=True.")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans) and end > start:
            labels[t] = ids[t]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def validate_messages(row: dict[str, Any], index: int, key: str = "messages") -> list[dict[str, str]]:
    """The conversation in column `key` of `row`, refusing one that is not a list of `{role, content}` messages."""
    messages = row.get(key)
    if not isinstance(messages, list) or not messages:
        raise SalsaError(
            f"Row {index} has no `{key}` list; SFT rows must look like "
            f'{{"{key}": [{{"role": "user", "content": ...}}, {{"role": "assistant", "content": ...}}]}}.'
        )
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SalsaError(f"Row {index} has a message without `role` and `content`; fix that row.")
    return messages
