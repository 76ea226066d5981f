"""Shared fixtures: tiny in-process models and a scripted llm-judge endpoint (no network), GPU auto-skip."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models: one thread avoids oversubscribing small CPUs (much faster on 2 shared cores)
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from salsa_lightning.models.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved in HF format: usable wherever a model id or path is accepted."""
    from salsa_lightning.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def ppo_pipeline(tiny_model_dir, tmp_path_factory):
    """Tiny LoRA SFT seeds 1 and 2, a LoRA reward model, and RL prompts: the inputs of a PPO run."""
    import shutil

    from helpers import addition_conversations, addition_preferences, reward_args, sft_args, write_jsonl, write_prompts

    from salsa_lightning.cli import main

    root = tmp_path_factory.mktemp("ppo-pipeline")
    sft = write_jsonl(root / "sft.jsonl", addition_conversations(48))
    prefs = write_jsonl(root / "prefs.jsonl", addition_preferences(48))
    write_prompts(root / "prompts.jsonl", 16, seed=9)
    for seed in (1, 2):
        main(sft_args(str(tiny_model_dir), str(sft), str(root / f"sft{seed}"), "--trainer.max_steps=3", "--model.model.lora.r=4",
                      "--model.optim.lr=1e-2", f"--seed_everything={seed}"))  # fmt: skip
    main(
        reward_args(
            str(root / "sft1"),
            str(prefs),
            str(root / "rm"),
            "--trainer.max_steps=4",
            "--model.model.lora.r=4",
            "--model.optim.lr=1e-2",
        )
    )
    shutil.copytree(root / "sft1", root / "sft1-copy")  # the same weights under another path (an independent anchor)
    main(["soup", f"--inputs=[{root / 'sft1'},{root / 'sft1-copy'}]", f"--output_dir={root / 'soup-identical'}"])
    main(["soup", f"--inputs=[{root / 'sft1'},{root / 'sft2'}]", f"--output_dir={root / 'soup'}"])
    return root


@pytest.fixture
def server_factory(monkeypatch):
    """`make(script)` starts a scripted OpenAI-compatible server (`llm_judge_server.JudgeServer`) on 127.0.0.1, with
    the test key's variable set and no proxy; every server is closed after the test."""
    from llm_judge_server import KEY_ENV, JudgeServer

    monkeypatch.setenv(KEY_ENV, "test-key")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback only, never through a proxy
    servers = []

    def make(script) -> JudgeServer:
        servers.append(JudgeServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def template(tmp_path) -> str:
    """The llm judge's test template (`llm_judge_server.TEST_TEMPLATE`) as a file: the path for `llm_judge.template`."""
    import yaml
    from llm_judge_server import TEST_TEMPLATE

    path = tmp_path / "template.yaml"
    path.write_text(yaml.safe_dump(TEST_TEMPLATE))
    return str(path)
