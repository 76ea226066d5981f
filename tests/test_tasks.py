"""The built-in task suite and its gold judge: determinism, the judge on hand-written answers for every family,
preference label noise, the in/out-of-distribution split, and failure without half-written output."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from salsa_lightning.data.families import FAMILIES, MAX_WORDS
from salsa_lightning.data.judge import compare, parse_prompt, score
from salsa_lightning.data.tasks import TaskSuiteConfig, build_task_suite, generate_task_suite, run_data
from salsa_lightning.errors import SalsaError

REPO = Path(__file__).resolve().parents[1]
FILES = ["sft.jsonl", "prefs_train.jsonl", "prefs_test.jsonl", "rl_prompts.jsonl", "eval_id.jsonl", "eval_ood.jsonl"]
FILLER = " ".join(["Let me explain this carefully so that nothing is missed."] * 5)  # > MAX_WORDS words


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """The default-sized suite, written once for the read-only tests."""
    out = tmp_path_factory.mktemp("suite") / "data"
    generate_task_suite(TaskSuiteConfig(output_dir=str(out), seed=0))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Files, determinism, manifest


def test_writes_every_file_in_the_real_datasets_formats(suite):
    assert sorted(p.name for p in suite.iterdir()) == sorted([*FILES, "manifest.json"])
    cfg = TaskSuiteConfig()
    sft = _read(suite / "sft.jsonl")
    assert len(sft) == cfg.num_sft
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    for name in ("prefs_train.jsonl", "prefs_test.jsonl"):
        rows = _read(suite / name)
        assert all(isinstance(r[k], str) for r in rows for k in ("prompt", "chosen", "rejected"))
    assert len(_read(suite / "rl_prompts.jsonl")) == cfg.num_rl_prompts
    for split in ("id", "ood"):
        rows = _read(suite / f"eval_{split}.jsonl")
        assert len(rows) == cfg.num_eval and {r["split"] for r in rows} == {split}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    small = dict(num_sft=60, num_prefs_train=60, num_prefs_test=20, num_rl_prompts=30, num_eval=30)
    a = generate_task_suite(TaskSuiteConfig(output_dir=str(tmp_path / "a"), seed=3, **small))
    b = generate_task_suite(TaskSuiteConfig(output_dir=str(tmp_path / "b"), seed=3, **small))
    generate_task_suite(TaskSuiteConfig(output_dir=str(tmp_path / "c"), seed=4, **small))
    assert a == b
    for name in [*FILES, "manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        if name != "manifest.json":
            assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name


def test_files_are_identical_across_processes_with_different_hash_seeds(tmp_path):
    # string hashing is randomised per process; nothing in the generator may depend on set or hash order
    import os
    import subprocess
    import sys

    code = (
        "import sys; from salsa_lightning.data.tasks import TaskSuiteConfig, generate_task_suite; "
        "generate_task_suite(TaskSuiteConfig(output_dir=sys.argv[1], num_sft=70, num_prefs_train=70, "
        "num_prefs_test=14, num_rl_prompts=14, num_eval=14))"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO / "src")}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], check=True, env=env)
    for name in [*FILES, "manifest.json"]:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_eval_prompts_do_not_depend_on_the_training_counts():
    # each file has its own random stream, so growing the SFT set leaves the benchmark as it was
    a = build_task_suite(TaskSuiteConfig(num_sft=10, num_eval=20))
    b = build_task_suite(TaskSuiteConfig(num_sft=50, num_eval=20))
    assert a["eval_id.jsonl"] == b["eval_id.jsonl"] and a["eval_ood.jsonl"] == b["eval_ood.jsonl"]


def test_manifest_counts_every_family_and_hashes_every_file(suite):
    manifest = json.loads((suite / "manifest.json").read_text())
    assert manifest["seed"] == 0 and "output_dir" not in manifest["config"]
    assert manifest["families"] == list(FAMILIES) and len(FAMILIES) >= 6
    for name in FILES:
        info = manifest["files"][name]
        assert info["sha256"] == hashlib.sha256((suite / name).read_bytes()).hexdigest()
        assert sum(info["per_family"].values()) == info["rows"] == len(_read(suite / name))
        assert max(info["per_family"].values()) - min(info["per_family"].values()) <= 1  # balanced


def test_data_config_yaml_loads_into_the_config_through_jsonargparse(tmp_path):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    # attribute docstrings are opt-in in jsonargparse; the CLI turns them on the same way
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        parser = ArgumentParser()
        parser.add_argument("--config", action=ActionConfigFile)
        parser.add_class_arguments(TaskSuiteConfig, "cfg")
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)
    yaml_path = REPO / "configs" / "quickstart" / "data.yaml"
    # the YAML's keys are the dataclass fields, so nest them under the group the parser gives the class
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "cfg:\n" + "".join(f"  {line}\n" for line in yaml_path.read_text().splitlines() if line[:1] != "#")
    )
    cfg = parser.instantiate_classes(parser.parse_args(["--config", str(nested)])).cfg
    assert cfg == TaskSuiteConfig(output_dir="outputs/quickstart/data")
    assert "real preference data agrees" in parser.format_help()  # attribute docstrings become --help


def test_run_data_prints_a_summary(tmp_path, capsys):
    run_data(TaskSuiteConfig(output_dir=str(tmp_path / "d"), num_sft=14, num_prefs_train=7, num_prefs_test=7,
                             num_rl_prompts=7, num_eval=7))  # fmt: skip
    out = capsys.readouterr().out
    assert "prefs" in out and "ood" in out and "arithmetic" in out and (tmp_path / "d" / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Splits


def test_ood_prompts_never_appear_in_training_data_or_the_id_eval(suite):
    prompts = {name: [r["prompt"] if "prompt" in r else r["messages"][0]["content"] for r in _read(suite / name)]
               for name in FILES}  # fmt: skip
    every = [p for ps in prompts.values() for p in ps]
    assert len(every) == len(set(every)), "a prompt appears twice across the suite"
    ood = set(prompts["eval_ood.jsonl"])
    assert not ood & set(prompts["eval_id.jsonl"])
    # stronger than no shared prompt: no shared phrasing either; every training prompt comes from an `id` template
    for name in FILES[:4] + ["eval_id.jsonl"]:
        assert {parse_prompt(p).split for p in prompts[name]} == {"id"}, name
    assert {parse_prompt(p).split for p in ood} == {"ood"}
    id_templates = {(t.text) for f in FAMILIES.values() for t in f.templates if t.split == "id"}
    ood_templates = {(t.text) for f in FAMILIES.values() for t in f.templates if t.split == "ood"}
    assert not id_templates & ood_templates


def test_every_eval_prompt_parses_back_to_its_family(suite):
    for split in ("id", "ood"):
        rows = _read(suite / f"eval_{split}.jsonl")
        assert {r["family"] for r in rows} == set(FAMILIES)
        for r in rows:
            task = parse_prompt(r["prompt"])
            assert (task.family, task.split) == (r["family"], split)


def test_ood_uses_harder_numbers():
    files = build_task_suite(TaskSuiteConfig(num_eval=140))

    def mean_operand(name: str) -> float:
        tasks = [parse_prompt(r["prompt"]) for r in files[name] if r["family"] == "arithmetic"]
        return sum(abs(int(t.slots["a"])) for t in tasks) / len(tasks)

    assert mean_operand("eval_ood.jsonl") > 2 * mean_operand("eval_id.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# The gold judge on hand-written responses: right, wrong, nearly right, for every family

ARITH, ARITH_OOD = "What is 7 + 5?", "Find the value of 2 + 3 * 4."
LETTERS, WORDS, VOWELS = (
    'How many times does the letter "r" appear in the word "strawberry"?',
    'How many words are in this sentence: "the cat sat on the mat"?',
    'What is the total number of vowels (a, e, i, o, u) in "banana"?',
)
KM, GRAMS = "Convert 3 kilometres to metres.", "How many kilograms are in 2500 grams?"
REVERSE, SORT, WORD_LIST = (
    "Reverse the list [1, 2, 3].",
    "Sort the list [10, 9, 100] from smallest to largest.",
    ("What is [apple, pear, fig] backwards?"),
)
UPPER = 'Rewrite this sentence in upper case: "the cat sat on the mat"'
EXACT = "Write a sentence about coffee in exactly 5 words."
JSON_P = 'Reply with a JSON object with the key "answer" set to the sum of 4 and 9.'

CASES = [
    # arithmetic
    (ARITH, "12", 1.0),
    (ARITH, "The answer is 12.", 1.0),
    (ARITH, "  7 + 5 = 12  ", 1.0),
    (ARITH, "twelve", 1.0),
    (ARITH, "12<|im_end|>", 1.0),
    (ARITH, "13", 0.0),
    (ARITH, "The answer is 12 or 13.", 0.0),
    (ARITH, "", 0.0),
    (ARITH, FILLER + " The answer is 12.", 0.5),
    ("What is 12 minus 20?", "-8", 1.0),
    ("What is 12 minus 20?", "8", 0.0),
    (ARITH_OOD, "2 + 3 * 4 = 14", 1.0),
    (ARITH_OOD, "20", 0.0),  # left to right: nearly right, still wrong
    ("I have 3 apples and get 4 more. How many apples do I have now?", "You have 7 apples.", 1.0),
    ("Subtract 5 from 12. What number do you get?", "-7", 0.0),
    # counting
    (LETTERS, "3", 1.0),
    (LETTERS, 'There are 3 "r"s in strawberry.', 1.0),
    (LETTERS, "Three.", 1.0),
    (LETTERS, "2", 0.0),
    (LETTERS, "10", 0.0),
    (LETTERS.upper(), "3", 1.0),
    (WORDS, "6 words.", 1.0),
    (WORDS, "5", 0.0),
    (VOWELS, "3", 1.0),
    (VOWELS, "6", 0.0),
    # units
    (KM, "3000 metres", 1.0),
    (KM, "3 kilometres is 3,000 metres.", 1.0),
    (KM, "3000.0 m", 1.0),
    (KM, "300 metres", 0.0),
    (KM, "0.003", 0.0),
    (GRAMS, "2500 grams is 2.5 kilograms.", 1.0),
    (GRAMS, "2.50 kg", 1.0),
    (GRAMS, "2500", 0.0),
    ("Convert 1 kilometer to meters.", "1000", 1.0),
    # list
    (REVERSE, "[3, 2, 1]", 1.0),
    (REVERSE, "3, 2, 1", 1.0),
    (REVERSE, "The reversed list is [3,2,1].", 1.0),
    (REVERSE, "Reversed:\n1. 3\n2. 2\n3. 1", 1.0),  # a numbered list is a harmless change of format
    (REVERSE, "- 3\n- 1\n- 2", 0.0),
    (REVERSE, "[1, 2, 3]", 0.0),
    (REVERSE, "[3, 1, 2]", 0.0),
    (REVERSE, "[3, 2]", 0.0),
    (SORT, "[9, 10, 100]", 1.0),
    (SORT, "[10, 100, 9]", 0.0),  # sorted as strings: nearly right, still wrong
    ("Arrange [3, 1, 2] from largest to smallest.", "[3, 2, 1]", 1.0),
    (WORD_LIST, '["fig", "pear", "apple"]', 1.0),
    (WORD_LIST, "[Fig, Pear, Apple]", 1.0),
    (WORD_LIST, "[fig, apple, pear]", 0.0),
    # upper case
    (UPPER, "THE CAT SAT ON THE MAT", 1.0),
    (UPPER, '"THE CAT SAT ON THE MAT."', 1.0),
    (UPPER, "Here it is: THE CAT SAT ON THE MAT", 1.0),
    (UPPER, "The cat sat on the mat.", 0.25),
    (UPPER, "THE CAT SAT ON THE mat", 0.25),
    (UPPER, "THE CAT SAT ON THE HAT", 0.0),
    (UPPER, "THE CAT SAT ON MAT", 0.0),
    (UPPER, "", 0.0),
    # exactly N words
    (EXACT, "I really love morning coffee.", 1.0),
    (EXACT, "  Coffee - I really love it ", 1.0),
    (EXACT, "I love coffee.", 0.0),
    (EXACT, "I really love hot morning coffee.", 0.0),
    (EXACT, "I really love morning tea.", 0.5),
    ("Describe cities using exactly 4 words.", "I love this city.", 1.0),  # singular is still on topic
    # JSON with a given key
    (JSON_P, '{"answer": 13}', 1.0),
    (JSON_P, '```json\n{"answer": 13}\n```', 1.0),
    (JSON_P, 'Sure! {"answer": "13", "note": "easy"}', 1.0),
    (JSON_P, '{"result": 13}', 0.5),
    (JSON_P, "13", 0.5),
    (JSON_P, "{'answer': 13}", 0.5),
    (JSON_P, '{"answer": 14}', 0.0),
    (JSON_P, "", 0.0),
]


@pytest.mark.parametrize(("prompt", "response", "expected"), CASES)
def test_gold_judge_on_hand_written_responses(prompt, response, expected):
    assert score(prompt, response) == expected


def test_hand_written_cases_cover_every_family():
    assert {parse_prompt(p).family for p, _, _ in CASES} == set(FAMILIES)


def test_judge_accepts_a_chat_templated_prompt():
    templated = "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n"
    assert score(templated, "12") == 1.0


def test_compare_gives_win_loss_tie_and_respects_the_margin():
    assert compare(ARITH, "12", "13") == "win"
    assert compare(ARITH, "13", "12") == "loss"
    assert compare(ARITH, "12", "The answer is 12.") == "tie"
    assert compare(ARITH, "13", "") == "tie"  # equally wrong
    verbose = FILLER + " The answer is 12."
    assert compare(ARITH, "12", verbose) == "win"
    assert compare(ARITH, "12", verbose, tie_margin=0.5) == "tie"
    with pytest.raises(SalsaError):
        compare(ARITH, "12", "13", tie_margin=-1)


@pytest.mark.parametrize(
    "prompt", ["Tell me a joke.", "Convert 3 kilometres to hours.", "Sort the list [b, a] from smallest to largest."]
)
def test_unknown_prompt_is_a_salsa_error(prompt):
    with pytest.raises(SalsaError, match="not one of the built-in task suite"):
        score(prompt, "anything")


def test_rambling_limit_is_the_documented_one():
    assert len(FILLER.split()) > MAX_WORDS


# ---------------------------------------------------------------------------------------------------------------------
# Generated responses against the judge


def test_generated_good_and_bad_responses_are_ranked_by_the_judge():
    import random

    rng = random.Random(0)
    for family in FAMILIES.values():
        for template in family.templates:
            for _ in range(15):
                task = parse_prompt(template.render(family.sample_slots(rng, template)))
                good = family.good(task, rng)
                kind, bad = family.bad(task, rng)
                assert score(task.prompt, good) == 1.0, (task.prompt, good)
                assert score(task.prompt, bad) < 1.0, (task.prompt, kind, bad)


@pytest.mark.parametrize("label_noise", [0.25, 0.1])
def test_preference_pairs_agree_with_the_gold_judge_at_the_configured_rate(label_noise):
    files = build_task_suite(TaskSuiteConfig(seed=1, label_noise=label_noise, num_prefs_train=400, num_prefs_test=100))
    for name in ("prefs_train.jsonl", "prefs_test.jsonl"):
        rows = files[name]
        verdicts = [compare(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
        assert "tie" not in verdicts  # every pair has a strictly better response
        agreement = verdicts.count("win") / len(rows)
        sigma = math.sqrt(label_noise * (1 - label_noise) / len(rows))
        assert abs(agreement - (1 - label_noise)) <= 3 * sigma + 1 / len(rows), (name, agreement)
        # the metadata column marks exactly the pairs whose labels the noise swapped
        assert [r["label_flipped"] for r in rows] == [v == "loss" for v in verdicts]


def test_sft_responses_are_imperfect_at_the_configured_rate(suite):
    rows = _read(suite / "sft.jsonl")
    scores = [score(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    flawed = sum(s < 1.0 for s in scores) / len(rows)
    assert flawed == pytest.approx(TaskSuiteConfig().imperfect_fraction, abs=1 / len(rows))
    assert all(r["messages"][1]["content"].strip() for r in rows)  # imperfect, never empty


def test_rejected_responses_cover_the_plausible_failure_modes(suite):
    rows = _read(suite / "prefs_train.jsonl")
    losers = [r["rejected"] if not r["label_flipped"] else r["chosen"] for r in rows]
    assert "" in losers  # empty
    assert any(len(x.split()) > MAX_WORDS for x in losers)  # rambling
    assert any(x.startswith("{'") for x in losers)  # wrong format (a Python dict, not JSON)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear sentence, nothing half-written


def test_existing_output_dir_without_overwrite_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SalsaError, match="already exists"):
        generate_task_suite(TaskSuiteConfig(output_dir=str(out)))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary directory left behind


def test_overwrite_replaces_the_directory(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "stale.jsonl").write_text("{}\n")
    generate_task_suite(TaskSuiteConfig(output_dir=str(out), overwrite=True, num_sft=7, num_eval=7))
    assert not (out / "stale.jsonl").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize(
    "bad",
    [{"label_noise": 0.7}, {"label_noise": -0.1}, {"imperfect_fraction": 1.5}, {"num_sft": -1}, {"num_eval": 2.5}],
)
def test_invalid_config_is_a_salsa_error_and_writes_nothing(tmp_path, bad):
    out = tmp_path / "data"
    with pytest.raises(SalsaError):
        generate_task_suite(TaskSuiteConfig(output_dir=str(out), **bad))
    assert list(tmp_path.iterdir()) == []


def test_too_many_prompts_for_the_template_space_is_a_salsa_error(tmp_path):
    # the space of distinct prompts is finite (exact_words: topics x lengths x phrasings); an absurd count fails
    with pytest.raises(SalsaError, match="lower the counts"):
        build_task_suite(
            TaskSuiteConfig(num_sft=20_000, num_prefs_train=0, num_prefs_test=0, num_rl_prompts=0, num_eval=0)
        )
