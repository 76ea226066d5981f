"""The command line itself: what it accepts, refuses and prints (issue 17 items 3 and 4)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    addition_conversations,
    addition_preferences,
    ppo_args,
    reward_args,
    sft_args,
    write_jsonl,
    write_prompts,
)

import salsa_lightning
from salsa_lightning.cli import cli_main, main
from salsa_lightning.modules.sft import causal_lm_loss

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(salsa_lightning.__file__).resolve().parents[1]  # the checkout under test, for subprocesses


def run_fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return " ".join(err.split())


def printed_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", addition_conversations(16))


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", addition_preferences(12))


# ---------------------------------------------------------------- papercuts of the parser


def test_optimizer_flag_is_refused_with_the_field_to_use(tiny_model_dir, sft_data, capsys):
    msg = run_fails(sft_args(str(tiny_model_dir), str(sft_data), None, "--optimizer=torch.optim.SGD",
                             "--optimizer.lr=0.1"), capsys)  # fmt: skip
    assert "--optimizer cannot be used" in msg and "model.optim" in msg


def test_usage_names_the_package_not_main_py(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SRC / "salsa_lightning" / "__main__.py")])
    with pytest.raises(SystemExit):
        cli_main(["fit", "--no-such-flag"])
    err = capsys.readouterr().err  # a bad option is one line that names the command (the usage is under --help)
    assert "`python -m salsa_lightning fit --help`" in err and "__main__.py" not in err
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "usage: python -m salsa_lightning" in out and "__main__.py" not in out


def test_model_help_takes_the_short_class_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model.help", "PPOModule"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--model.policy_init" in out and "__main__.py" not in out


def test_model_takes_the_short_class_name(capsys):
    printed = printed_config(["fit", "--model=SFTModule", "--data=SFTDataModule", "--data.data=x.jsonl"], capsys)
    assert printed["model"]["class_path"] == "salsa_lightning.modules.sft.SFTModule"
    assert printed["data"]["class_path"] == "salsa_lightning.data.sft.SFTDataModule"


def test_optional_field_nested_in_a_spec_can_be_switched_off(capsys):
    ppo = ["fit", "--model=PPOModule", "--model.policy_init=sft", "--model.reward_fn=a:b"]
    printed = printed_config([*ppo, "--model.ppo.missing_eos_penalty=1.5", "--model.ppo.kl_coef=0.2",
                              "--model.ppo.missing_eos_penalty=null"], capsys)  # fmt: skip
    assert printed["model"]["init_args"]["ppo"]["missing_eos_penalty"] is None
    assert printed["model"]["init_args"]["ppo"]["kl_coef"] == 0.2  # its neighbours keep their values
    # and deeper: LoRA off in a config that sets it (the YAML's `lora: null`)
    printed = printed_config(["fit", "--config", str(ROOT / "configs/quickstart/sft.yaml"), "--model.model.lora=null"],
                             capsys)  # fmt: skip
    assert printed["model"]["init_args"]["model"]["lora"] is None
    assert printed["model"]["init_args"]["model"]["name_or_path"] == "embedded:smollm2-135m-instruct"


def test_only_subcommands_a_stage_implements_are_listed(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert "validate" in out and "test" in out and "predict" not in out


def test_validate_on_a_policy_is_refused_with_a_sentence(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8, seed=0)
    args = ppo_args(str(tiny_model_dir), str(prompts), reward_fn="helpers:fraction_of_a")
    msg = run_fails(["validate", *args[1:]], capsys)
    assert "PPOModule has no validation_step" in msg and "evaluate" in msg


# ---------------------------------------------------------------- validate / test


def test_validate_reports_sft_perplexity(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "existing-output"  # validate writes nothing, so an existing output_dir is no reason to refuse
    out.mkdir()
    cli = cli_main(["validate", *sft_args(str(tiny_model_dir), str(sft_data), str(out))[1:]])
    nll, n = 0.0, 0
    cli.model.eval()
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader():
            loss, _, n_tokens = cli.model.model_step(batch)
            nll, n = nll + float(loss) * int(n_tokens), n + int(n_tokens)
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/perplexity"]) == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert float(metrics["val/loss"]) == pytest.approx(nll / n, rel=1e-4)
    assert list(out.iterdir()) == []


def test_test_reports_sft_perplexity_on_every_row(tiny_model_dir, sft_data):
    cli = cli_main(["test", *sft_args(str(tiny_model_dir), str(sft_data), None)[1:]])
    assert len(cli.datamodule.test_set) == 16  # the whole file, no hold-out
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in cli.datamodule.test_dataloader():
            logits = cli.model(batch["input_ids"], batch["attention_mask"])
            loss, _, n_tokens = causal_lm_loss(logits, batch["labels"])
            nll, n = nll + float(loss) * int(n_tokens), n + int(n_tokens)
    assert float(cli.trainer.callback_metrics["test/perplexity"]) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_test_reports_reward_accuracy_on_a_preference_file(tiny_model_dir, pref_data):
    cli = cli_main(["test", *reward_args(str(tiny_model_dir), str(pref_data), None)[1:]])
    assert len(cli.datamodule.test_set) == 12
    wins = []
    with torch.no_grad():
        for batch in cli.datamodule.test_dataloader():
            chosen, rejected = cli.model(batch["input_ids"], batch["attention_mask"]).chunk(2)
            wins += (chosen > rejected).tolist()
    assert float(cli.trainer.callback_metrics["test/accuracy"]) == pytest.approx(sum(wins) / len(wins), abs=1e-6)


# ---------------------------------------------------------------- quiet output


def test_ppo_fit_prints_no_val_loop_tip_or_head_report(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8, seed=0)
    args = ppo_args(str(tiny_model_dir), str(prompts), "--trainer.max_steps=1", reward_fn="helpers:fraction_of_a")
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([str(SRC), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "salsa_lightning", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "val_dataloader" not in proc.stderr
    assert "Tip:" not in proc.stderr  # Lightning's litlogger / litmodels advertisement
    assert "LOAD REPORT" not in proc.stderr  # the critic's new `score` head is new by design


def test_soup_prints_nothing_to_stderr_and_never_loads_bitsandbytes(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A LoRA soup (the quickstart's kind) needs no PEFT, whose import loads bitsandbytes; on CPUs with AVX512-BF16
    that prints a kernel warning, so the test checks the import itself, which any machine can see."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    seeds = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))  # fmt: skip
        path = tmp_path / f"sft-seed{seed}"
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        manifest = {"stage": "sft", "format": "lora", "base_model": str(tiny_model_dir), "seed": seed}
        (path / "salsa_manifest.json").write_text(json.dumps(manifest))
        seeds.append(path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(tmp_path / 'modules.txt')!r}, 'w').write('\\n'.join(sys.modules)))\n"
    )
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([str(SRC), str(hook)])}
    # the quickstart's soup config, pointed at these seeds
    config = yaml.safe_load((ROOT / "configs/quickstart/soup.yaml").read_text())
    config.update(inputs=[str(s) for s in seeds], output_dir=str(tmp_path / "soup"))
    (tmp_path / "soup.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "salsa_lightning", "soup", "--config", str(tmp_path / "soup.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (tmp_path / "soup" / "adapter_model.safetensors").is_file()
    loaded = set((tmp_path / "modules.txt").read_text().split())
    assert "bitsandbytes" not in loaded and "peft" not in loaded
