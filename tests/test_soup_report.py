"""The soup stage's opt-in `report:` on tiny full-weight and LoRA seeds: its seed rows are the seeds' own scores and
its soup row the written soup's, KL(soup ‖ seed) is 0 for a soup of identical seeds, the files are written in the
soup's output, bad report settings are refused before any work, and without `report` nothing changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl
from landscape_helpers import GEN, direct_scores, save_lora_seed, save_reward_model

from salsa_lightning.cli import cli_main, main
from salsa_lightning.data.tasks import TaskSuiteConfig, build_task_suite
from salsa_lightning.errors import SalsaError
from salsa_lightning.landscape import points as points_module
from salsa_lightning.soup.config import SoupConfig, SoupReport
from salsa_lightning.soup.run import run_soup
from salsa_lightning.stage import read_manifest

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILES = ["soup_report.csv", "soup_report.json", "soup_report.md"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    from salsa_lightning.models.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("soup-report-inputs")
    suite = build_task_suite(TaskSuiteConfig(num_sft=0, num_prefs_train=0, num_prefs_test=0, num_rl_prompts=0,
                                             num_eval=5))  # fmt: skip
    full = [str(save_tiny_checkpoint(root / f"full-seed{s}", seed=s)) for s in (1, 2)]
    lora = [str(save_lora_seed(root / f"lora-seed{s}", tiny_model_dir, s, tiny_tokenizer, r=s + 1)) for s in (1, 2)]
    return {
        "full": full,
        "lora": lora,
        # a second copy of seed 1 under another name: a soup of two identical seeds is seed 1
        "full-twins": [full[0], str(shutil.copytree(full[0], root / "full-seed1-copy"))],
        "lora-twins": [lora[0], str(shutil.copytree(lora[0], root / "lora-seed1-copy"))],
        "rm": str(save_reward_model(root / "rm", tiny_tokenizer)),
        "eval": str(write_jsonl(root / "eval_id.jsonl", suite["eval_id.jsonl"])),
    }


def report(inputs: dict, **overrides) -> SoupReport:
    kwargs = {"eval_file": inputs["eval"], "limit": 3, "judges": ["gold", "reward"], "reward_model": inputs["rm"],
              "bootstrap_samples": 100, **GEN, **overrides}  # fmt: skip
    return SoupReport(**kwargs)


def soup_with_report(inputs: dict, kind: str, out: Path, **overrides) -> dict:
    run_soup(SoupConfig(inputs=inputs[kind], output_dir=str(out), report=report(inputs), **overrides), quiet=True)
    return json.loads((out / "soup_report.json").read_text())


@pytest.fixture(scope="module", params=["full", "lora"])
def reported(request, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"soup-report-{request.param}") / "soup"
    return request.param, out, soup_with_report(inputs, request.param, out)


def test_writes_the_report_inside_the_soup_output(reported):
    _, out, saved = reported
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [r["model"] for r in saved["rows"]] == ["seed1", "seed2", "soup"]
    assert saved["prompts"]["n"] == 3 and saved["judges"] == ["gold", "reward"]
    assert not any(p.name.startswith(".soup.tmp") for p in out.parent.iterdir())  # renamed into place, whole
    manifest = read_manifest(out)
    assert manifest["report"]["files"] == REPORT_FILES and manifest["report"]["prompts"] == saved["prompts"]
    assert yaml.safe_load((out / "config.yaml").read_text())["report"]["limit"] == 3
    md = (out / "soup_report.md").read_text()
    assert "| seed1 |" in md and "| soup |" in md and "KL(soup‖·)" in md


def test_seed_rows_are_the_seeds_own_scores_and_the_soup_row_the_written_soup(reported, inputs):
    """Each seed's row is what the seed alone scores; the soup's row is what the soup directory just written scores."""
    kind, out, saved = reported
    rows = {r["model"]: r for r in saved["rows"]}
    for label, model in [("seed1", inputs[kind][0]), ("seed2", inputs[kind][1]), ("soup", str(out))]:
        _, golds, rewards = direct_scores(model, inputs["eval"], inputs["rm"])
        assert rows[label]["gold"] == sum(golds) / 3 and rows[label]["reward"] == sum(rewards) / 3, label
        assert rows[label]["reward_ci"][0] <= rows[label]["reward"] <= rows[label]["reward_ci"][1]
    assert len({rows[m]["reward"] for m in rows}) == 3  # the three models answer differently: not equal by chance
    assert rows["soup"]["weights"] == [0.5, 0.5] and rows["seed2"]["weights"] == [0.0, 1.0]


def test_kl_of_the_soup_to_each_seed(reported):
    _, _, saved = reported
    seeds, soup = saved["rows"][:2], saved["rows"][2]
    for r in seeds:
        # a sequence-level k1 estimate on the soup's own responses: positive here (it need not be per sample)
        assert r["kl_soup_seed"] > 0 and r["kl_seed_soup"] > 0
    assert soup["kl_soup_seed"] is None and soup["kl_seed_soup"] is None


@pytest.mark.parametrize("kind", ["full-twins", "lora-twins"])
def test_a_soup_of_identical_seeds_is_at_kl_zero(inputs, tmp_path, kind):
    saved = soup_with_report(inputs, kind, tmp_path / "soup")
    rows = {r["model"]: r for r in saved["rows"]}
    for label in ("seed1", "seed2"):
        if kind == "full-twins":  # ½θ + ½θ is θ exactly in float arithmetic
            assert rows[label]["kl_soup_seed"] == 0.0 and rows[label]["kl_seed_soup"] == 0.0
        assert rows[label]["kl_soup_seed"] == pytest.approx(0.0, abs=1e-4)
        assert rows[label]["kl_seed_soup"] == pytest.approx(0.0, abs=1e-4)
        assert rows[label]["reward"] == pytest.approx(rows["soup"]["reward"], abs=1e-5)


def test_one_input_the_soup_is_the_seed(inputs, tmp_path):
    run_soup(SoupConfig(inputs=inputs["full"][:1], output_dir=str(tmp_path / "soup"), report=report(inputs)), True)
    rows = json.loads((tmp_path / "soup" / "soup_report.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["seed1", "soup"]
    assert (
        rows[0]["kl_soup_seed"] == 0.0 and rows[0]["gold"] == rows[1]["gold"] and rows[0]["reward"] == rows[1]["reward"]
    )


def test_without_report_the_soup_is_as_before(inputs, tmp_path, monkeypatch, capsys):
    def no_generation(*args, **kwargs):
        raise AssertionError("a soup without `report` generated")

    monkeypatch.setattr(points_module, "generate_responses", no_generation)
    manifest = run_soup(SoupConfig(inputs=inputs["full"], output_dir=str(tmp_path / "soup")))
    printed = capsys.readouterr().out
    assert "soup ->" in printed and "Soup report" not in printed and "KL" not in printed
    assert "report" not in manifest and "report" not in read_manifest(tmp_path / "soup")
    assert not any((tmp_path / "soup" / name).exists() for name in REPORT_FILES)


def test_the_report_table_is_printed_after_the_soup(inputs, tmp_path, capsys):
    run_soup(SoupConfig(inputs=inputs["full"], output_dir=str(tmp_path / "soup"), report=report(inputs, limit=2)))
    printed = capsys.readouterr().out
    assert printed.index("soup ->") < printed.index("Soup report") < printed.index("seed2")
    assert "KL(soup‖·)" in printed and "[95%" in printed  # in 80 columns the interval headers wrap


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_soup_of_a_soup_does_not_inherit_its_report(inputs, tmp_path, kind):
    """A soup copies its first input's side files (tokenizer, configs); a report is not one of them."""
    first = Path(shutil.copytree(inputs[kind][0], tmp_path / "reported-soup"))
    (first / "soup_report.json").write_text("{}")
    run_soup(SoupConfig(inputs=[str(first), inputs[kind][1]], output_dir=str(tmp_path / "soup2")), quiet=True)
    assert (tmp_path / "soup2" / "tokenizer_config.json").is_file()
    assert not any((tmp_path / "soup2" / name).exists() for name in REPORT_FILES)


@pytest.mark.parametrize(
    "kind, overrides, soup_overrides, match",
    [
        ("full", {"eval_file": "missing/eval.jsonl"}, {}, r"`report`: eval_file: .*does not exist"),
        ("full", {"judges": ["reward"], "reward_model": None}, {}, r"`report`: The reward judge needs a reward model"),
        ("full", {"judges": ["llm"]}, {}, r"`report`: Unknown or no judges \['llm'\]"),
        ("full", {"reward_model": "./missing/rm"}, {}, r"`report`: The reward model ./missing/rm: .*does not exist"),
        ("full", {"max_new_tokens": 0}, {}, r"`report`: max_new_tokens must be >= 1"),
        ("lora", {}, {"lora_combination": "approx_average"}, r"exact soup.*set `lora_combination: cat`"),
    ],
)
def test_bad_report_settings_are_refused_before_any_work(inputs, tmp_path, monkeypatch, kind, overrides,
                                                         soup_overrides, match):  # fmt: skip
    import salsa_lightning.soup.run as soup_run

    def no_soup(*args, **kwargs):
        raise AssertionError("the soup was built before the report was checked")

    monkeypatch.setattr(soup_run, "plan_full_soup", no_soup)
    monkeypatch.setattr(soup_run, "soup_lora_adapters", no_soup)
    cfg = SoupConfig(inputs=inputs[kind], output_dir=str(tmp_path / "soup"), report=report(inputs, **overrides),
                     **soup_overrides)  # fmt: skip
    with pytest.raises(SalsaError, match=match):
        run_soup(cfg, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_report_is_one_sentence_and_exit_2(inputs, tmp_path, capsys):
    path = tmp_path / "soup.yaml"
    path.write_text(yaml.safe_dump({"inputs": inputs["full"], "output_dir": str(tmp_path / "soup"),
                                    "report": {"eval_file": str(tmp_path / "nope.jsonl")}}))  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(["soup", "--config", str(path)])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: In the soup's `report`: eval_file:" in err and "nope.jsonl" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["soup", "--config", str(path), "--report.judges", "[gold, llm]"])
    assert exc.value.code == 2
    assert "`--report.judges` accepts one of 'gold', 'reward', not 'llm'" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()


def test_cli_runs_the_report_from_yaml(inputs, tmp_path):
    cfg = {"inputs": inputs["lora"], "output_dir": str(tmp_path / "soup"),
           "report": {"eval_file": inputs["eval"], "limit": 2, "judges": ["gold"], "bootstrap_samples": 20, **GEN}}  # fmt: skip
    path = tmp_path / "soup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["soup", "--config", str(path), "--report.limit", "1"])
    saved = json.loads((tmp_path / "soup" / "soup_report.json").read_text())
    assert cli.result["report"]["prompts"]["n"] == saved["prompts"]["n"] == 1 and saved["rows"][0]["reward"] is None


def test_quickstart_soup_report_config_parses(capsys):
    args = ["--config", str(ROOT / "configs/quickstart/soup.yaml")]
    with pytest.raises(SystemExit) as exc:
        cli_main(["soup", *args, "--print_config"])
    assert exc.value.code in (0, None) and yaml.safe_load(capsys.readouterr().out)["report"] is None  # opt-in
    with pytest.raises(SystemExit) as exc:
        cli_main(["soup", *args, "--config", str(ROOT / "configs/quickstart/soup-report.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["report"]["eval_file"] == "outputs/quickstart/data/eval_id.jsonl" and printed["report"]["judges"]
    assert printed["inputs"] == ["outputs/quickstart/sft-seed1", "outputs/quickstart/sft-seed2"]
