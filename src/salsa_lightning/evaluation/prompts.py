"""Evaluation prompts with one or more user turns, read from whichever column a dataset keeps them in.

Benchmarks name and shape their prompt column differently: UltraFeedback's `prompt` is a string,
MT-Bench's `prompt` (HuggingFaceH4/mt_bench_prompts) a list of two user turns, Arena-Hard's `turns`
(lmarena-ai/arena-hard-auto-v0.1) a list of {content} dicts. A row with several user turns is a
conversation: turn k is asked after the system's OWN answers to the turns before it (MT-Bench's protocol),
so every turn after the first has a prompt that differs from system to system.

Responses of a split are kept in one flat list of items (row, turn), row by row: the turn-1 and turn-2
answers to one MT-Bench question sit next to each other, and the win rates count every turn (n = 160 for
MT-Bench's 80 questions, as in the paper's Table 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from salsa_lightning.data.chat import Messages
from salsa_lightning.data.prompts import prompt_messages
from salsa_lightning.errors import SalsaError


@dataclass
class EvalPrompt:
    """One evaluation row: the first turn's prompt and the user turns asked after it."""

    messages: Messages  # the first turn's prompt (a system message may precede the user's)
    followups: list[str]  # later user turns, each asked after the system's own answer to the one before

    @property
    def num_turns(self) -> int:
        return 1 + len(self.followups)


def _user_turns(value: list, where: str) -> list[str] | None:
    """The texts of a list of user turns (strings or {content} dicts without roles); None for a messages list."""
    if all(isinstance(v, str) for v in value):
        return list(value)
    if all(isinstance(v, dict) and "content" in v and "role" not in v for v in value):
        return [str(v["content"]) for v in value]
    if all(isinstance(v, dict) and "role" in v and "content" in v for v in value):
        return None
    raise SalsaError(
        f"{where} is a list of neither strings, {{content}} dicts nor {{role, content}} messages; fix the row or "
        "point `prompt_columns` at the column that holds the prompt."
    )


def read_prompt(row: dict[str, Any], index: int, column: str | None = None) -> EvalPrompt:
    """The prompt of `row` from `column` (None: `prompt`, else `messages`, as for RL prompts).

    The column may hold a string (one user turn), a list of user turns (strings or {content} dicts: several
    make a multi-turn prompt) or a messages list (the turns before its first assistant turn).
    """
    if column is None:
        if not isinstance(row.get("prompt"), list):
            return EvalPrompt(prompt_messages(row, index), [])
        column = "prompt"
    if column not in row:
        raise SalsaError(
            f"Evaluation row {index} has no column {column!r} (its columns: {', '.join(sorted(row))}); "
            "set `prompt_columns` to the column that holds the prompt."
        )
    value, where = row[column], f"Evaluation row {index}'s {column!r}"
    if isinstance(value, str):
        return EvalPrompt([{"role": "user", "content": value}], [])
    if not isinstance(value, list) or not value:
        raise SalsaError(f"{where} is neither a string nor a non-empty list; fix the row or `prompt_columns`.")
    turns = _user_turns(value, where)
    if turns is None:  # a messages list: as RL prompts read it (`messages` loses its first assistant turn on)
        return EvalPrompt(prompt_messages({"messages" if column == "messages" else "prompt": value}, index), [])
    return EvalPrompt([{"role": "user", "content": turns[0]}], turns[1:])


def turn_items(prompts: Sequence[EvalPrompt]) -> list[tuple[int, int]]:
    """(row, turn) of every response a system gives, row by row (turn 0 is the first)."""
    return [(row, turn) for row, p in enumerate(prompts) for turn in range(p.num_turns)]


def conversations(prompts: Sequence[EvalPrompt], answers: Sequence[str | None]) -> list[Messages]:
    """Each item's prompt (items as `turn_items` lists them): turn 0's is the row's own; turn k's is turn k-1's
    prompt, the system's answer to it (`answers[item]`) and the next user turn. An item whose earlier answer is
    still None (not generated yet) gets None."""
    out: list[Messages | None] = []
    previous: Messages | None = None
    k = 0
    for p in prompts:
        for turn in range(p.num_turns):
            if turn == 0:
                conv = list(p.messages)
            elif previous is None or answers[k - 1] is None:
                conv = None
            else:
                conv = [
                    *previous,
                    {"role": "assistant", "content": answers[k - 1]},
                    {"role": "user", "content": p.followups[turn - 1]},
                ]
            out.append(conv)
            previous, k = conv, k + 1
    return out  # type: ignore[return-value]
