"""Evaluation prompts: each benchmark's prompt column read into a first turn and later user turns, and the
conversation of each later turn built from the system's own earlier answers."""

from __future__ import annotations

import pytest

from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.prompts import EvalPrompt, conversations, read_prompt, turn_items


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    "row, column, expected",
    [
        ({"prompt": "Hi"}, None, EvalPrompt([user("Hi")], [])),  # UltraFeedback
        ({"prompt": ["Q1", "Q2"]}, None, EvalPrompt([user("Q1")], ["Q2"])),  # MT-Bench (HuggingFaceH4)
        ({"turns": ["Q1", "Q2"]}, "turns", EvalPrompt([user("Q1")], ["Q2"])),  # MT-Bench (FastChat's question.jsonl)
        ({"turns": [{"content": "Q"}]}, "turns", EvalPrompt([user("Q")], [])),  # Arena-Hard v0.1
        ({"question": "Q", "prompt": "not this"}, "question", EvalPrompt([user("Q")], [])),
        ({"prompt": [user("Q")]}, None, EvalPrompt([user("Q")], [])),  # a messages list
        (
            {"messages": [{"role": "system", "content": "S"}, user("Q"), {"role": "assistant", "content": "A"}]},
            None,
            EvalPrompt([{"role": "system", "content": "S"}, user("Q")], []),  # up to the first assistant turn
        ),
    ],
)
def test_read_prompt_understands_each_benchmarks_column(row, column, expected):
    assert read_prompt(row, 0, column) == expected


@pytest.mark.parametrize(
    "row, column, match",
    [
        ({"prompt": "x"}, "turns", "no column 'turns' \\(its columns: prompt\\)"),
        ({"turns": []}, "turns", "neither a string nor a non-empty list"),
        ({"turns": [1, 2]}, "turns", "list of neither strings"),
        ({"other": 1}, None, "neither `prompt` nor"),
    ],
)
def test_read_prompt_names_the_row_and_the_fix(row, column, match):
    with pytest.raises(SalsaError, match=match):
        read_prompt(row, 3, column)


def test_later_turns_hold_the_systems_own_earlier_answers():
    prompts = [EvalPrompt([user("a1")], ["a2", "a3"]), EvalPrompt([user("b1")], [])]
    items = turn_items(prompts)
    assert items == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert conversations(prompts, [None] * 4) == [[user("a1")], None, None, [user("b1")]]  # before any answer
    answers = ["r1", "r2", "r3", "s1"]
    convs = conversations(prompts, answers)
    assert convs[1] == [user("a1"), {"role": "assistant", "content": "r1"}, user("a2")]
    assert convs[2] == [*convs[1], {"role": "assistant", "content": "r2"}, user("a3")]
    assert convs[3] == [user("b1")]
