"""The `evaluate` stage on tiny systems: every table and the plot are written, the judges do what they say,
KL to oneself is 0, responses are reused when nothing changed, and bad input leaves nothing behind."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import addition_conversations, addition_preferences, reward_args, sft_args, write_jsonl

from salsa_lightning.cli import EXTRA_COMMANDS, ExtraCommand, cli_main, main
from salsa_lightning.data.tasks import TaskSuiteConfig, build_task_suite
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.run import run_evaluate
from salsa_lightning.models.tiny import save_tiny_checkpoint
from salsa_lightning.stage import read_manifest

ROOT = Path(__file__).resolve().parents[1]
TABLES = ["win_rates.csv", "win_rates.md", "systems.csv", "systems.md", "results.json", "judgements.jsonl"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: thread start-up costs more than the matmuls, and the machine's cores are shared
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def systems(tiny_model_dir, tmp_path_factory):
    """Tiny systems: the base, another random init, a LoRA SFT adapter on the base; a reward model; eval prompts."""
    root = tmp_path_factory.mktemp("eval-systems")
    save_tiny_checkpoint(root / "other", seed=1)
    quiet = ("--trainer.max_steps=1", "--trainer.enable_progress_bar=false")
    sft = write_jsonl(root / "sft.jsonl", addition_conversations(16))
    prefs = write_jsonl(root / "prefs.jsonl", addition_preferences(16))
    cwd = os.getcwd()
    os.chdir(root)  # `fit` without a logger saves its config.yaml in the working directory, not in the repository
    try:
        main(sft_args(str(tiny_model_dir), str(sft), str(root / "sft"), "--model.model.lora.r=4", *quiet))
        main(reward_args(str(tiny_model_dir), str(prefs), str(root / "rm"), *quiet))
    finally:
        os.chdir(cwd)
    suite = build_task_suite(
        TaskSuiteConfig(num_sft=0, num_prefs_train=0, num_prefs_test=0, num_rl_prompts=0, num_eval=5)
    )
    write_jsonl(root / "eval_id.jsonl", suite["eval_id.jsonl"])
    write_jsonl(root / "eval_ood.jsonl", suite["eval_ood.jsonl"])
    return {
        "root": root,
        "base": str(tiny_model_dir),
        "other": str(root / "other"),
        "sft": str(root / "sft"),
        "rm": str(root / "rm"),
    }


def config(built: dict, out: Path, **overrides) -> EvalConfig:
    root = built["root"]
    kwargs = {
        "systems": {"sft": built["sft"], "base": built["base"], "other": built["other"]},
        "eval_files": {"id": str(root / "eval_id.jsonl"), "ood": str(root / "eval_ood.jsonl")},
        "judges": ["gold", "reward"],
        "reward_model": built["rm"],
        "max_new_tokens": 6,
        "batch_size": 3,
        "limit": 4,
        "bootstrap_samples": 200,
        "output_dir": str(out),
        **overrides,
    }
    return EvalConfig(**kwargs)


def register_evaluate(monkeypatch) -> None:
    """The registry's own `evaluate` entry, set again (and undone after the test) so this test does not depend on it."""
    config, run = "salsa_lightning.evaluation.config:EvalConfig", "salsa_lightning.evaluation.run:run_evaluate"
    monkeypatch.setitem(EXTRA_COMMANDS, "evaluate", ExtraCommand(config, run, "Evaluate systems pairwise."))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(systems, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-run") / "eval"
    kl = {"init": systems["base"], "sft": systems["sft"]}
    results = run_evaluate(config(systems, out, kl_reference=kl), quiet=True)
    return out, results


def test_writes_every_table_the_plot_and_a_manifest(evaluated):
    out, results = evaluated
    for name in [*TABLES, "reward_distribution.png", "config.yaml", "salsa_manifest.json"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "reward_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = read_manifest(out)
    assert manifest["stage"] == "evaluate"
    assert sorted(p.name for p in out.iterdir()) == manifest["files"]
    assert manifest["pairs"] == [["sft", "base"], ["sft", "other"], ["base", "other"]]  # all pairs, in order
    assert yaml.safe_load((out / "config.yaml").read_text())["systems"]["sft"].endswith("sft")

    # 2 judges x 3 pairs x 2 splits, in the CSV, results.json and the Markdown
    rows = list(csv.DictReader(open(out / "win_rates.csv")))
    assert len(rows) == len(results["pairs"]) == 12
    for r in rows:
        assert int(r["wins"]) + int(r["losses"]) + int(r["ties"]) == int(r["n"]) == 4
        assert float(r["adjusted_win_rate_lo"]) <= float(r["adjusted_win_rate"]) <= float(r["adjusted_win_rate_hi"])
    md = (out / "win_rates.md").read_text()
    assert "### Judge: gold" in md and "### Judge: reward" in md and "| sft vs base |" in md
    assert "id Adj. Win Rate" in md and "ood Adj. Win Rate" in md

    systems_rows = list(csv.DictReader(open(out / "systems.csv")))
    assert {(r["system"], r["split"]) for r in systems_rows} == {
        (s, p) for s in ("sft", "base", "other") for p in ("id", "ood")
    }
    assert {"gold_score", "reward", "length", "kl_init", "kl_sft"} <= set(systems_rows[0])
    assert "kl_init" in (out / "systems.md").read_text()

    for system in ("sft", "base", "other"):
        for split in ("id", "ood"):
            rows = read_jsonl(out / f"responses_{system}_{split}.jsonl")
            assert len(rows) == 4
            assert all(r["num_tokens"] == len(r["response_ids"]) <= 6 for r in rows)
            assert all({"reward", "gold_score", "kl"} <= set(r) for r in rows)


def test_gold_judge_on_untrained_systems_says_tie_and_gives_50(evaluated):
    # random tiny models answer no suite task, so every gold verdict is a tie
    _, results = evaluated
    for r in (r for r in results["pairs"] if r["judge"] == "gold"):
        assert (r["wins"], r["losses"], r["ties"]) == (0, 0, 4)
        assert r["adjusted_win_rate"] == 50.0 and r["win_rate"] == 0.0
        assert r["adjusted_win_rate_ci"] == [50.0, 50.0]


def test_kl_of_a_system_to_itself_is_zero(evaluated):
    _, results = evaluated
    by = {(r["system"], r["split"]): r for r in results["systems"]}
    for split in ("id", "ood"):
        assert by[("base", split)]["kl"]["init"] == 0.0  # the base is the `init` reference
        assert by[("sft", split)]["kl"]["sft"] == 0.0
        assert by[("other", split)]["kl"]["init"] != 0.0  # another init does differ


def test_kl_and_lengths_match_the_response_files(evaluated):
    out, results = evaluated
    by = {(r["system"], r["split"]): r for r in results["systems"]}
    rows = read_jsonl(out / "responses_other_id.jsonl")
    assert by[("other", "id")]["kl"]["init"] == pytest.approx(sum(r["kl"]["init"] for r in rows) / len(rows))
    assert by[("other", "id")]["length"] == pytest.approx(sum(r["num_tokens"] for r in rows) / len(rows))
    assert by[("other", "id")]["reward"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows))


def test_reward_judge_follows_the_rewards_and_its_tie_margin(systems, tmp_path):
    # sampling makes the two systems' responses (and rewards) differ
    two = {"base": systems["base"], "other": systems["other"]}
    cfg = config(systems, tmp_path / "eval", systems=two, judges=["reward"], do_sample=True, seed=3, max_new_tokens=4)
    first = run_evaluate(cfg, quiet=True)
    a = read_jsonl(tmp_path / "eval" / "responses_base_id.jsonl")
    b = read_jsonl(tmp_path / "eval" / "responses_other_id.jsonl")
    expected = [
        "win" if x["reward"] > y["reward"] else "loss" if x["reward"] < y["reward"] else "tie"
        for x, y in zip(a, b, strict=True)
    ]
    judged = [j["verdict"] for j in read_jsonl(tmp_path / "eval" / "judgements.jsonl") if j["split"] == "id"]
    assert judged == expected
    id_row = next(r for r in first["pairs"] if r["split"] == "id")
    assert id_row["wins"] + id_row["losses"] > 0

    # a margin wider than any reward gap: every verdict is a tie, and the responses are reused, not regenerated
    cfg.reward_tie_margin, cfg.overwrite = 1e6, True
    second = run_evaluate(cfg, quiet=True)
    for r in second["pairs"]:
        assert (r["wins"], r["losses"], r["ties"]) == (0, 0, 4) and r["adjusted_win_rate"] == 50.0
    assert all(s["reused_responses"] for s in second["systems"])
    assert read_jsonl(tmp_path / "eval" / "responses_base_id.jsonl") == a


def test_sampling_is_repeatable_for_a_seed(systems, tmp_path):
    two = {"base": systems["base"], "other": systems["other"]}
    common = {
        "systems": two,
        "judges": ["gold"],
        "reward_model": None,
        "max_new_tokens": 4,
        "eval_files": {"id": str(systems["root"] / "eval_id.jsonl")},
    }
    texts = []
    for name, extra in [("s1", {"do_sample": True, "seed": 5}), ("s2", {"do_sample": True, "seed": 5})]:
        run_evaluate(config(systems, tmp_path / name, **common, **extra), quiet=True)
        texts.append([r["response_ids"] for r in read_jsonl(tmp_path / name / "responses_other_id.jsonl")])
    assert texts[0] == texts[1]


def test_cli_runs_the_command_from_yaml(systems, tmp_path, monkeypatch):
    register_evaluate(monkeypatch)
    root = systems["root"]
    cfg = {
        "systems": {"sft": systems["sft"], "base": systems["base"]},
        "pairs": [["sft", "base"]],
        "eval_files": {"ood": str(root / "eval_ood.jsonl")},
        "judges": ["gold"],
        "max_new_tokens": 4,
        "limit": 3,
        "bootstrap_samples": 50,
        "output_dir": str(tmp_path / "eval"),
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["evaluate", "--config", str(path), "--batch_size", "2"])
    assert cli.result["pairs"][0]["n"] == 3
    assert yaml.safe_load((tmp_path / "eval" / "config.yaml").read_text())["batch_size"] == 2
    # without a reward model the plot shows the gold scores
    assert cli.result["plot"]["quantity"] == "gold score" and (tmp_path / "eval" / "reward_distribution.png").is_file()

    # a user error through `main`: one line, exit status 2, nothing written
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--config", str(path), "--output_dir", str(tmp_path / "bad"), "--pairs", "[[sft, nope]]"])
    assert exc.value.code == 2 and not (tmp_path / "bad").exists()


def test_quickstart_eval_config_parses(monkeypatch, capsys):
    register_evaluate(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli_main(["evaluate", "--config", str(ROOT / "configs/quickstart/eval.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed["systems"]) == {"salsa", "ppo", "sft"}
    assert set(printed["kl_reference"]) == {"init", "soup"}
    assert printed["pairs"] == [["salsa", "ppo"], ["salsa", "sft"], ["ppo", "sft"]]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"pairs": [["sft", "nope"]]}, "not in `systems`"),
        ({"pairs": [["sft", "sft"]]}, "with itself"),
        ({"eval_files": {"id": "missing/eval_id.jsonl"}}, "does not exist"),
        ({"judges": ["reward"], "reward_model": None}, "needs a reward model"),
        ({"systems": {"a": "./missing/model-dir"}}, "does not exist"),
        ({"systems": {"a": "no-such-org/no-such-model"}}, "Could not load model"),
        ({"systems": {"bad/name": "x"}}, "file names"),
        ({"plot_pair": ["sft", "nope"]}, "plot_pair"),
        ({"reward_tie_margin": -1.0}, "reward_tie_margin"),
        ({"score_batch_size": 0}, "score_batch_size"),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(systems, tmp_path, overrides, match):
    with pytest.raises(SalsaError, match=match):
        run_evaluate(config(systems, tmp_path / "eval", **overrides), quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_non_suite_prompts_are_refused_by_the_gold_judge(systems, tmp_path):
    write_jsonl(tmp_path / "free.jsonl", [{"prompt": "Tell me a story."}])
    with pytest.raises(SalsaError, match="gold judge"):
        run_evaluate(config(systems, tmp_path / "eval", eval_files={"free": str(tmp_path / "free.jsonl")}), quiet=True)
    assert not (tmp_path / "eval").exists()


def test_existing_output_dir_is_refused_and_kept(systems, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SalsaError, match="already exists"):
        run_evaluate(config(systems, out), quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["eval"] and (out / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------- benchmark sets: alpaca_eval export, turns, columns
def test_responses_are_exported_for_alpaca_eval(evaluated):
    out, _ = evaluated
    assert sorted(p.name for p in (out / "alpaca_eval").iterdir()) == ["id", "ood"]
    for system in ("sft", "base", "other"):
        for split in ("id", "ood"):
            records = json.loads((out / "alpaca_eval" / split / f"{system}.json").read_text())
            responses = read_jsonl(out / f"responses_{system}_{split}.jsonl")
            assert len(records) == len(responses) == 4
            for record, response in zip(records, responses, strict=True):
                assert set(record) == {"instruction", "output", "generator"}
                assert record["generator"] == system
                assert record["output"] == response["response"]
                assert record["instruction"] == response["prompt"]  # the suite's prompts are strings
    # the same instructions for every system: alpaca_eval pairs two generators' outputs by instruction
    first = [json.loads((out / "alpaca_eval" / "id" / f"{s}.json").read_text()) for s in ("sft", "base")]
    assert [r["instruction"] for r in first[0]] == [r["instruction"] for r in first[1]]


MT_BENCH_ROWS = [  # HuggingFaceH4/mt_bench_prompts' schema: `prompt` is the list of the two user turns
    {"prompt": ["Write a haiku about rain.", "Now make it rhyme."], "prompt_id": 1, "category": "writing",
     "reference": []},
    {"prompt": ["What is 7 times 8?", "And divided by 4?"], "prompt_id": 2, "category": "math", "reference": ["56"]},
    {"prompt": ["Name a prime number.", "Name a larger one."], "prompt_id": 3, "category": "math", "reference": []},
]  # fmt: skip
ARENA_HARD_ROWS = [  # lmarena-ai/arena-hard-auto-v0.1's schema: `turns` is a list of {content} dicts, one turn
    {"question_id": "q1", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "Sort [3, 1, 2]."}]},
    {"question_id": "q2", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "Explain a mutex."}]},
]


def test_mt_bench_turn_two_follows_the_systems_own_turn_one_answer(systems, tmp_path):
    from salsa_lightning.evaluation.generation import encode_prompts, generate_responses
    from salsa_lightning.models.loading import ModelSpec, load_causal_lm, load_tokenizer

    mt = write_jsonl(tmp_path / "mt_bench.jsonl", MT_BENCH_ROWS)
    arena = write_jsonl(tmp_path / "arena_hard.jsonl", ARENA_HARD_ROWS)
    two = {"base": systems["base"], "other": systems["other"]}
    cfg = config(
        systems, tmp_path / "eval", systems=two, judges=["reward"], batch_size=1, max_new_tokens=5,
        do_sample=True, seed=3,  # greedy tiny models answer every question alike; sampled answers differ
        eval_files={"mt_bench": str(mt), "arena_hard": str(arena)},
        prompt_columns={"arena_hard": "turns"},  # MT-Bench's `prompt` needs no entry: the default column
        hub_splits={"mt_bench": "train", "arena_hard": "train"},  # ignored by local files
    )  # fmt: skip
    results = run_evaluate(cfg, quiet=True)
    assert results["prompts"]["mt_bench"] == {"source": str(mt), "n": 3, "responses_per_system": 6}
    mt_pairs = [r for r in results["pairs"] if r["split"] == "mt_bench"]
    assert [r["n"] for r in mt_pairs] == [6]  # both turns judged
    assert next(r for r in results["pairs"] if r["split"] == "arena_hard")["n"] == 2

    rows = {s: read_jsonl(tmp_path / "eval" / f"responses_{s}_mt_bench.jsonl") for s in two}
    for records in rows.values():
        assert [(r["index"], r["turn"]) for r in records] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
        for first, second, source in zip(records[::2], records[1::2], MT_BENCH_ROWS, strict=True):
            q1, q2 = source["prompt"]
            assert first["prompt"] == [{"role": "user", "content": q1}]
            assert second["prompt"] == [
                {"role": "user", "content": q1},
                {"role": "assistant", "content": first["response"]},  # the system's OWN turn-1 answer
                {"role": "user", "content": q2},
            ]
            assert all("reward" in r for r in (first, second))
    # the two systems answered turn 1 differently, so their turn-2 prompts differ
    assert [r["prompt"] for r in rows["base"][1::2]] != [r["prompt"] for r in rows["other"][1::2]]

    # `other`'s answers again, the naive way: turn 1 on every question, then turn 2 on [q1, its answer, q2],
    # from the same seed (one prompt a batch, so the sampling order is the run's)
    model = load_causal_lm(ModelSpec(systems["other"], dtype=cfg.dtype), trainable=False)
    tokenizer = load_tokenizer(ModelSpec(systems["other"]), padding_side="left")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        turn1_ids, _ = encode_prompts(
            tokenizer, [[{"role": "user", "content": r["prompt"][0]}] for r in MT_BENCH_ROWS], 512
        )
        turn1 = generate_responses(model, tokenizer, turn1_ids, 5, 1, do_sample=True)
        turn2_prompts = [
            [{"role": "user", "content": r["prompt"][0]}, {"role": "assistant", "content": g.text},
             {"role": "user", "content": r["prompt"][1]}]
            for r, g in zip(MT_BENCH_ROWS, turn1, strict=True)
        ]  # fmt: skip
        turn2 = generate_responses(
            model, tokenizer, encode_prompts(tokenizer, turn2_prompts, 512)[0], 5, 1, do_sample=True
        )
    assert [g.token_ids for g in turn1] == [r["response_ids"] for r in rows["other"][::2]]
    assert [g.token_ids for g in turn2] == [r["response_ids"] for r in rows["other"][1::2]]

    arena_rows = read_jsonl(tmp_path / "eval" / "responses_base_arena_hard.jsonl")
    assert [r["prompt"] for r in arena_rows] == [[{"role": "user", "content": "Sort [3, 1, 2]."}],
                                                 [{"role": "user", "content": "Explain a mutex."}]]  # fmt: skip
    # alpaca_eval: the first turn only, under the question itself
    exported = json.loads((tmp_path / "eval" / "alpaca_eval" / "mt_bench" / "base.json").read_text())
    assert [r["instruction"] for r in exported] == [r["prompt"][0] for r in MT_BENCH_ROWS]
    assert [r["output"] for r in exported] == [r["response"] for r in rows["base"][::2]]

    # re-judging reuses both turns of both systems: same responses, same turn-2 prompts
    cfg.overwrite = True
    again_results = run_evaluate(cfg, quiet=True)
    assert all(s["reused_responses"] for s in again_results["systems"])
    assert read_jsonl(tmp_path / "eval" / "responses_other_mt_bench.jsonl") == rows["other"]


def test_a_split_reads_its_hub_split_and_prompt_column(monkeypatch):
    """The Hub path without a network: `load_rows` is given the configured split; the column mapping picks the
    prompt out of a differently named column."""
    import datasets

    from salsa_lightning.evaluation import splits

    calls = []

    def fake_load_rows(source: str, split: str = "train"):
        calls.append((source, split))
        return datasets.Dataset.from_list([{"id": 1, "question": "Why is the sky blue?", "prompt": "unused"}])

    monkeypatch.setattr(splits, "load_rows", fake_load_rows)
    cfg = EvalConfig(
        systems={"a": "x"},
        eval_files={"qa": "some-org/some-set", "uf": "HuggingFaceH4/ultrafeedback_binarized"},
        hub_splits={"qa": "validation"},
        prompt_columns={"qa": "question"},
    )
    qa = splits.load_split(cfg, "qa", need_gold=False)
    uf = splits.load_split(cfg, "uf", need_gold=False)
    assert calls == [("some-org/some-set", "validation"), ("HuggingFaceH4/ultrafeedback_binarized", "test")]
    assert qa.prompts[0].messages == [{"role": "user", "content": "Why is the sky blue?"}] and qa.items == [(0, 0)]
    assert uf.prompts[0].messages == [{"role": "user", "content": "unused"}]  # the default column: `prompt`

    cfg.prompt_columns = {"qa": "instruction"}
    with pytest.raises(SalsaError, match=r"eval_files\.qa .*no column 'instruction' \(its columns: id, prompt, "):
        splits.load_split(cfg, "qa", need_gold=False)


@pytest.mark.parametrize("key", ["hub_splits", "prompt_columns"])
def test_a_mapping_for_an_unknown_split_is_refused(systems, tmp_path, key):
    with pytest.raises(SalsaError, match=f"`{key}` names the split 'nope'"):
        run_evaluate(config(systems, tmp_path / "eval", **{key: {"nope": "x"}}), quiet=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["sft as reward model", "reward model as system"])
def test_a_model_in_the_wrong_role_is_refused_before_any_work(systems, tmp_path, case):
    out = tmp_path / "eval"
    if case == "sft as reward model":  # it would score with a randomly initialised head
        cfg, match = config(systems, out, reward_model=systems["sft"]), "no trained reward head"
    else:
        cfg = config(systems, out, systems={"sft": systems["rm"], "base": systems["base"]}, pairs=[["sft", "base"]])
        match = "a reward model; it needs a policy"
    with pytest.raises(SalsaError, match=match):
        run_evaluate(cfg, quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("do_sample", [False, True])
def test_response_fingerprints_of_existing_outputs_do_not_change(tiny_model_dir, tmp_path, do_sample):
    """A system's responses are reused when the hash of this content matches the manifest's: any change to what goes
    into it would make every existing output regenerate, so the content is pinned as it was first written."""
    import hashlib

    from salsa_lightning.evaluation.responses import _fingerprint
    from salsa_lightning.evaluation.runtime import model_signature
    from salsa_lightning.evaluation.splits import load_split

    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 2 + 3?"}])
    cfg = EvalConfig(systems={"a": str(tiny_model_dir)}, eval_files={"id": str(eval_file)}, do_sample=do_sample,
                     temperature=0.7, seed=3, batch_size=4, max_new_tokens=9, dtype="float32")  # fmt: skip
    content = {
        "model": model_signature(str(tiny_model_dir)),
        "prompts": [[{"role": "user", "content": "What is 2 + 3?"}]],
        "dtype": "float32",
        "max_new_tokens": 9,
        "max_prompt_length": 512,
        "do_sample": do_sample,
        "temperature": 0.7 if do_sample else None,
        "seed": 3 if do_sample else None,
        "batch_size": 4,
    }
    expected = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    assert _fingerprint(cfg, str(tiny_model_dir), load_split(cfg, "id", False)) == expected
