"""Every YAML in configs/ parses through the CLI (`--print_config`), alone and with the debug config stacked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from salsa_lightning.cli import EXTRA_COMMANDS, cli_main

ROOT = Path(__file__).resolve().parents[1]
# stage-agnostic overlays (strategy + `fsdp:` block, no model class): stacked on every paper stage config
OVERLAYS = sorted((ROOT / "configs" / "fsdp").glob("fsdp[12]-*.yaml"))
STAGE_CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in {"debug", "ablations"} and p not in OVERLAYS
)
DEBUG_CONFIGS = sorted((ROOT / "configs" / "debug").glob("*.yaml"))
# ablations are stacked on a quickstart stage config, as their headers say
ABLATIONS = {p: ROOT / "configs/quickstart/salsa.yaml" for p in sorted((ROOT / "configs" / "ablations").glob("*.yaml"))}


def subcommand_for(path: Path) -> str:
    """`fit` for Lightning configs (trainer/model/data keys); otherwise the extra command whose fields match."""
    import dataclasses

    keys = set(yaml.safe_load(path.read_text()) or {})
    if keys & {"trainer", "model", "data"}:
        return "fit"
    for name, cmd in EXTRA_COMMANDS.items():
        if keys <= {f.name for f in dataclasses.fields(cmd.load(cmd.config))}:
            return name
    raise AssertionError(f"{path}: no subcommand takes the keys {sorted(keys)}")


def test_configs_exist():
    assert STAGE_CONFIGS, "no configs found"
    assert (ROOT / "configs" / "quickstart" / "sft.yaml") in STAGE_CONFIGS


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand_for(path), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and printed


@pytest.mark.parametrize("debug", DEBUG_CONFIGS, ids=lambda p: p.name)
def test_debug_config_stacks(debug: Path, capsys):
    with pytest.raises(SystemExit):
        cli_main(
            ["fit", "--config", str(ROOT / "configs/quickstart/sft.yaml"), "--config", str(debug), "--print_config"]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == yaml.safe_load(debug.read_text())["trainer"]["max_steps"]


@pytest.mark.parametrize("ablation", list(ABLATIONS), ids=lambda p: p.name)
def test_ablation_stacks_on_its_stage_config(ablation: Path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ABLATIONS[ablation]), "--config", str(ablation), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(ablation.read_text())["model"]["init_args"]
    for key, value in expected.items():
        assert printed["model"]["init_args"][key] == value, key


# FSDP1 runs the SFT and reward stages; FSDP2 every stage
OVERLAY_STAGES = [
    (overlay, stage)
    for overlay in OVERLAYS
    for stage in (("sft", "reward") if overlay.name.startswith("fsdp1") else ("sft", "reward", "ppo", "salsa"))
]


@pytest.mark.parametrize(("overlay", "stage"), OVERLAY_STAGES, ids=lambda x: x.name if isinstance(x, Path) else x)
def test_fsdp_overlay_stacks_on_every_stage(overlay: Path, stage: str, capsys):
    stage_config = ROOT / f"configs/paper/llama2-7b/{stage}.yaml"
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(stage_config), "--config", str(overlay), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    wanted = yaml.safe_load(overlay.read_text())
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == wanted["trainer"]["strategy"]["class_path"]
    assert wanted["trainer"]["strategy"]["init_args"].items() <= strategy["init_args"].items()
    if strategy["class_path"].endswith("ModelParallelStrategy"):
        world = printed["trainer"]["devices"] * printed["trainer"]["num_nodes"]
        assert strategy["init_args"]["data_parallel_size"] == world
        assert strategy["init_args"]["tensor_parallel_size"] == 1
    for key, value in wanted["model"]["init_args"].items():  # the overlay's module settings, merged field by field
        got = printed["model"]["init_args"][key]
        assert (value.items() <= got.items()) if isinstance(value, dict) else got == value, key
    # and the stage's own module and model settings survive the overlay
    stage_cfg = yaml.safe_load(stage_config.read_text())
    assert printed["model"]["class_path"] == stage_cfg["model"]["class_path"]
    model = stage_cfg["model"]["init_args"].get("model", {})
    if "name_or_path" in model:
        assert printed["model"]["init_args"]["model"]["name_or_path"] == model["name_or_path"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for name in ["fit", "validate", *EXTRA_COMMANDS]:
        assert name in out


def test_override_from_command_line(capsys):
    with pytest.raises(SystemExit):
        cli_main(
            ["fit", "--config", str(ROOT / "configs/quickstart/sft.yaml"), "--model.optim.lr", "0.5", "--print_config"]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["optim"]["lr"] == 0.5


def test_tensorboard_logger_is_an_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/quickstart/sft.yaml"),
                  "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir=tb",
                  "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"


PAPER_EVALS = sorted((ROOT / "configs" / "paper").glob("*/eval.yaml"))


@pytest.mark.parametrize("path", PAPER_EVALS, ids=lambda p: p.parent.name)
def test_paper_eval_reads_its_recipes_outputs_and_the_three_sets(path: Path, capsys):
    assert len(PAPER_EVALS) == 3 and {p.parent.name for p in PAPER_EVALS} == {"llama2-7b", "mistral-7b", "gemma-2b"}
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--config", str(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)

    def stage(name: str) -> dict:
        return yaml.safe_load((path.parent / f"{name}.yaml").read_text())

    ppo = stage("ppo")["model"]["init_args"]
    sft_seed1 = stage("sft")["model"]["init_args"]["output_dir"].replace("{seed}", "1")
    assert printed["systems"] == {
        "salsa": stage("salsa")["model"]["init_args"]["output_dir"],
        "ppo": ppo["output_dir"],
        "sft": sft_seed1,
    }
    assert ppo["policy_init"] == sft_seed1  # the SFT system is where both policies start
    assert printed["reward_model"] == stage("reward")["model"]["init_args"]["output_dir"]
    assert printed["kl_reference"] == {"init": sft_seed1, "soup": stage("soup")["output_dir"]}
    assert printed["eval_files"] == {
        "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
        "mt_bench": "HuggingFaceH4/mt_bench_prompts",
        "arena_hard": "lmarena-ai/arena-hard-auto-v0.1",
    }
    assert printed["hub_splits"] == {"ultrafeedback": "test_prefs", "mt_bench": "train", "arena_hard": "train"}
    assert printed["prompt_columns"]["arena_hard"] == "turns"
    assert "llm" in printed["judges"] and printed["llm_judge"]["api_key_env"] == "OPENAI_API_KEY"
    assert "sk-" not in path.read_text()  # a key never goes in a config
