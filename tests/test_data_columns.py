"""The cached tokenisation gives the token ids of the row-by-row code it replaced, for every stage; the column names
are options (OpenRLHF's --input_key), and a missing column is one sentence naming the columns found and the option."""

from __future__ import annotations

import pytest
from helpers import addition_conversations, addition_preferences, sft_args, write_jsonl

from salsa_lightning.cli import main
from salsa_lightning.data.chat import (
    IGNORE_INDEX,
    conversation,
    encode_left_truncated,
    last_assistant_text,
    tokenize_conversation,
)
from salsa_lightning.data.preferences import PairCollator, PreferenceDataModule
from salsa_lightning.data.prompts import PromptDataModule, prompt_messages
from salsa_lightning.data.sft import SFTDataModule
from salsa_lightning.errors import SalsaError

LONG_USER = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Fine."}]
SFT_ROWS = addition_conversations(12) + [{"messages": LONG_USER}]
PREF_ROWS = [
    *({**r, "margin": 0.5 if i % 2 else None} for i, r in enumerate(addition_preferences(10))),
    {"prompt": "Hi", "chosen": "Same.", "rejected": "Same. ", "margin": 1.0},  # identical: dropped
    {"prompt": "word " * 60, "chosen": "The answer is 5.", "rejected": "banana", "margin": 2.0},  # truncated
    {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "chosen": "2", "rejected": "3", "margin": None},
]
PROMPT_ROWS = [{"prompt": "What is 2 + 3?"}, {"prompt": "word " * 50 + "What is 1 + 1?"}] * 3


# the row-by-row encoders that `datasets.map` replaced, as they were (the reference for the token ids)
def sft_before(rows, tokenizer, max_length):
    out = []
    for row in rows:
        enc = tokenize_conversation(tokenizer, row["messages"], max_length)
        if not all(label == IGNORE_INDEX for label in enc["labels"]):
            out.append(enc)
    return out


def pairs_before(rows, tokenizer, max_length):
    out, truncated = [], 0
    for row in rows:
        if last_assistant_text(row["chosen"]).strip() == last_assistant_text(row["rejected"]).strip():
            continue
        prompt = row.get("prompt") or ""
        chosen, t1 = encode_left_truncated(tokenizer, conversation(prompt, row["chosen"]), max_length)
        rejected, t2 = encode_left_truncated(tokenizer, conversation(prompt, row["rejected"]), max_length)
        truncated += int(t1 or t2)
        item = {"chosen_ids": chosen, "rejected_ids": rejected}
        if row.get("margin") is not None:
            item["margin"] = float(row["margin"])
        out.append(item)
    return out, truncated


def prompts_before(rows, tokenizer, max_prompt_length):
    out, truncated = [], 0
    for i, row in enumerate(rows):
        messages = prompt_messages(row, i)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated += len(ids) > max_prompt_length
        out.append({"input_ids": ids[-max_prompt_length:], "messages": messages})
    return out, truncated


def renamed(rows: list[dict], names: dict[str, str]) -> list[dict]:
    return [{names.get(k, k): v for k, v in r.items()} for r in rows]


@pytest.mark.parametrize("names", [{}, {"messages": "conversation"}])
def test_sft_gives_the_ids_of_the_row_by_row_code(tiny_tokenizer, tmp_path, names):
    data = write_jsonl(tmp_path / "sft.jsonl", renamed(SFT_ROWS, names))
    dm = SFTDataModule(str(data), tiny_tokenizer, max_length=40, messages_key=names.get("messages", "messages"))
    dm.setup("test")
    assert dm.test_set.to_list() == sft_before(SFT_ROWS, tiny_tokenizer, 40)
    assert len(dm.test_set) == len(SFT_ROWS) - 1  # the long user turn leaves no assistant token


@pytest.mark.filterwarnings("ignore:Dropped 1 preference")
@pytest.mark.parametrize("names", [{}, {"prompt": "question", "chosen": "good", "rejected": "bad"}])
def test_preferences_give_the_ids_of_the_row_by_row_code(tiny_tokenizer, tmp_path, names):
    data = write_jsonl(tmp_path / "prefs.jsonl", renamed(PREF_ROWS, names))
    keys = {f"{k}_key": v for k, v in names.items()}
    dm = PreferenceDataModule(str(data), tiny_tokenizer, max_length=40, **keys)
    dm.setup("test")
    expected, truncated = pairs_before(PREF_ROWS, tiny_tokenizer, 40)
    got = [{k: v for k, v in r.items() if v is not None} for r in dm.test_set.to_list()]  # (a null margin: none)
    assert got == expected
    assert dm.counts == {"test_identical_dropped": 1, "test_truncated": truncated} and 0 < truncated < len(expected)
    collate = PairCollator(tiny_tokenizer.pad_token_id)
    for a, b in [(0, 4), (1, 4)]:  # a batch without a margin, and one where every row has one
        ours, theirs = collate(dm.test_set.to_list()[a:b:2]), collate(expected[a:b:2])
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


@pytest.mark.filterwarnings("ignore:.*max_prompt_length")
@pytest.mark.parametrize("names", [{}, {"prompt": "instruction"}])
def test_prompts_give_the_ids_of_the_row_by_row_code(tiny_tokenizer, tmp_path, names):
    data = write_jsonl(tmp_path / "prompts.jsonl", renamed(PROMPT_ROWS, names))
    dm = PromptDataModule(str(data), tiny_tokenizer, max_prompt_length=32, prompt_key=names.get("prompt", "prompt"))
    dm.setup()
    expected, truncated = prompts_before(PROMPT_ROWS, tiny_tokenizer, 32)
    assert dm.rows.to_list() == expected
    assert dm.truncated == truncated == 3


def test_prompts_from_a_renamed_messages_column(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", renamed(addition_conversations(4), {"messages": "dialog"}))
    dm = PromptDataModule(str(data), tiny_tokenizer, messages_key="dialog")
    dm.setup()
    assert dm.rows[0]["messages"] == addition_conversations(4)[0]["messages"][:1]  # the turns before the answer


@pytest.mark.parametrize(
    "cls, rows, kwargs, option",
    [
        (SFTDataModule, addition_conversations(4), {"messages_key": "conversation"}, "messages_key"),
        (PreferenceDataModule, renamed(addition_preferences(4), {"chosen": "win"}), {}, "chosen_key"),
        (PreferenceDataModule, addition_preferences(4), {"rejected_key": "lose"}, "rejected_key"),
        (PreferenceDataModule, addition_preferences(4), {"prompt_key": "question"}, "prompt_key"),
        (PromptDataModule, [{"text": "Hi", "id": 1}], {}, "prompt_key"),
    ],
)
def test_a_missing_column_names_the_columns_found_and_the_option(tiny_tokenizer, tmp_path, cls, rows, kwargs, option):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(SalsaError, match=f"data.{option}") as err:
        cls(str(data), tiny_tokenizer, **kwargs).setup("test" if cls is not PromptDataModule else None)
    found = ", ".join(rows[0])
    assert f"(its columns: {found})" in str(err.value) and str(data) in str(err.value)


def test_a_prompt_column_is_optional_for_whole_conversations(tiny_tokenizer, tmp_path):
    rows = [{"chosen": conversation(r["prompt"], r["chosen"]), "rejected": conversation(r["prompt"], r["rejected"])}
            for r in addition_preferences(4)]  # fmt: skip
    dm = PreferenceDataModule(str(write_jsonl(tmp_path / "p.jsonl", rows)), tiny_tokenizer)
    dm.setup("test")
    assert len(dm.test_set) == 4


@pytest.mark.parametrize(
    "kwargs, option",
    [({"messages_key": ""}, "messages_key"), ({"chosen_key": "x", "rejected_key": "x"}, "rejected_key")],
)
def test_bad_column_options_are_refused_before_any_work(kwargs, option):
    cls = SFTDataModule if "messages_key" in kwargs else PreferenceDataModule
    with pytest.raises(SalsaError, match=f"data.{option}"):
        cls("rows.jsonl", **kwargs)  # the file is never looked at


def test_a_missing_column_exits_with_the_sentence(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", addition_conversations(8))
    args = sft_args(str(tiny_model_dir), str(data), str(tmp_path / "out"), "--data.messages_key=dialog")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and "has no column `dialog` (its columns: messages)" in err
    assert "set `data.messages_key`" in err and not (tmp_path / "out").exists()
