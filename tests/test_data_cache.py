"""Tokenisation through `datasets.map` and its cache: a second run loads the tokens (measured faster), every setting
that changes the tokens is a new cache entry, and several tokenising processes give the very same rows."""

from __future__ import annotations

import time

import pytest
from helpers import addition_conversations, addition_preferences, write_jsonl, write_prompts

from salsa_lightning.data.preferences import PreferenceDataModule
from salsa_lightning.data.prompts import PromptDataModule
from salsa_lightning.data.sft import SFTDataModule
from salsa_lightning.data.sources import load_rows
from salsa_lightning.models.tiny import make_tiny_tokenizer


def cache_entries(cache_dir) -> set[str]:
    return {p.name for p in cache_dir.glob("*.arrow")}


def timed_setup(dm) -> float:
    start = time.perf_counter()
    dm.setup("fit")
    return time.perf_counter() - start


def test_a_second_run_loads_the_tokens_instead_of_tokenising_again(tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", addition_conversations(3000))
    load_rows(str(data))  # `datasets`' own JSON -> Arrow cache is warm for both runs: they differ in tokenising alone
    cache = tmp_path / "cache"
    first = SFTDataModule(str(data), tiny_tokenizer, cache_dir=str(cache))
    first_s = timed_setup(first)
    entries = cache_entries(cache)
    assert len(entries) == 2  # the training rows and the held-out rows
    second = SFTDataModule(str(data), make_tiny_tokenizer(), cache_dir=str(cache))  # an equal, fresh tokenizer
    second_s = timed_setup(second)
    print(f"\n3000 SFT rows: first setup {first_s:.2f} s (tokenised), second {second_s:.2f} s (from the cache)")
    assert second_s < first_s
    assert cache_entries(cache) == entries  # nothing new was written
    assert second.train_set.cache_files[0]["filename"].rsplit("/", 1)[-1] in entries
    assert second.train_set.to_list() == first.train_set.to_list()
    assert second.val_set.to_list() == first.val_set.to_list()


@pytest.fixture()
def small_sft(tmp_path):
    return write_jsonl(tmp_path / "small.jsonl", addition_conversations(40))


def other_template(tokenizer):
    changed = make_tiny_tokenizer()
    changed.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    return changed


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda tok: ({"max_length": 24}, tok), id="max_length"),
        pytest.param(lambda tok: ({}, other_template(tok)), id="chat_template"),
        pytest.param(lambda tok: ({}, make_tiny_tokenizer(vocab_size=320)), id="vocabulary"),
    ],
)
def test_each_setting_that_changes_the_tokens_is_a_new_cache_entry(tiny_tokenizer, small_sft, tmp_path, change):
    cache = tmp_path / "cache"
    base = SFTDataModule(str(small_sft), tiny_tokenizer, val_fraction=0.25, cache_dir=str(cache))
    base.setup()
    before = cache_entries(cache)
    kwargs, tokenizer = change(tiny_tokenizer)
    changed = SFTDataModule(str(small_sft), tokenizer, val_fraction=0.25, cache_dir=str(cache), **kwargs)
    changed.setup()
    assert len(cache_entries(cache) - before) == 2  # new training and held-out entries, the old ones kept
    assert changed.train_set._fingerprint != base.train_set._fingerprint
    assert changed.train_set.to_list() != base.train_set.to_list()


def test_a_rewritten_data_file_is_tokenised_again(tiny_tokenizer, small_sft, tmp_path):
    cache = tmp_path / "cache"
    SFTDataModule(str(small_sft), tiny_tokenizer, val_fraction=0.25, cache_dir=str(cache)).setup()
    before = cache_entries(cache)
    write_jsonl(small_sft, addition_conversations(40, seed=1))
    dm = SFTDataModule(str(small_sft), tiny_tokenizer, val_fraction=0.25, cache_dir=str(cache))
    dm.setup()
    assert len(cache_entries(cache) - before) == 2
    assert "The answer is" in tiny_tokenizer.decode(dm.train_set[0]["input_ids"])


def test_the_default_cache_lies_next_to_the_loaded_rows(tiny_tokenizer, small_sft):
    dm = SFTDataModule(str(small_sft), tiny_tokenizer, val_fraction=0.25)
    dm.setup()
    rows_dir = load_rows(str(small_sft)).cache_files[0]["filename"].rsplit("/", 1)[0]
    assert dm.train_set.cache_files[0]["filename"].startswith(rows_dir + "/cache-")


def stage_modules(tmp_path, tokenizer, **kwargs):
    sft = write_jsonl(tmp_path / "sft.jsonl", addition_conversations(60))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", addition_preferences(60))
    prompts = write_prompts(tmp_path / "prompts.jsonl", 60, seed=3)
    return [
        SFTDataModule(str(sft), tokenizer, **kwargs),
        PreferenceDataModule(str(prefs), tokenizer, max_length=14, **kwargs),
        PromptDataModule(str(prompts), tokenizer, **kwargs),
    ]


def tokenized_rows(dm) -> list[list[dict]]:
    sets = [dm.rows] if isinstance(dm, PromptDataModule) else [dm.train_set, dm.val_set]
    return [s.to_list() for s in sets]


@pytest.mark.filterwarnings("ignore:.*max_prompt_length")
def test_two_tokenising_processes_give_the_same_rows(tiny_tokenizer, tmp_path):
    one = stage_modules(tmp_path, tiny_tokenizer, cache_dir=str(tmp_path / "one"))
    two = stage_modules(tmp_path, tiny_tokenizer, cache_dir=str(tmp_path / "two"), num_proc=2)
    for a, b in zip(one, two):
        a.setup("fit")
        b.setup("fit")
        assert tokenized_rows(a) == tokenized_rows(b)
    assert any("_of_00002" in name for name in cache_entries(tmp_path / "two"))  # it did run in two processes


def _tokenise_in_child(data: str, cache: str, queue) -> None:
    dm = SFTDataModule(data, make_tiny_tokenizer(), cache_dir=cache)
    dm.setup("fit")
    queue.put(dm.train_set.to_list())


def test_ranks_tokenising_at_once_leave_a_sound_cache(tiny_tokenizer, tmp_path):
    """Two processes (as the ranks of a distributed run) write the same cache entry at once: `datasets` writes each
    to a temporary file and renames it, so both get the full rows and a later run reads a whole file."""
    import multiprocessing

    data = str(write_jsonl(tmp_path / "sft.jsonl", addition_conversations(600)))
    load_rows(data)  # (as on a real run, where each rank also reads the same JSON cache)
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    ranks = [ctx.Process(target=_tokenise_in_child, args=(data, cache, queue)) for _ in range(2)]
    for p in ranks:
        p.start()
    results = [queue.get(timeout=120) for _ in ranks]
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    later = SFTDataModule(data, tiny_tokenizer, cache_dir=cache)
    later.setup("fit")
    assert results[0] == results[1] == later.train_set.to_list()
    assert len(cache_entries(tmp_path / "cache")) == 2  # one entry each for the training and held-out rows
