"""Small builders shared by tests (data files, CLI argument lists)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def addition_conversations(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: 'What is a + b?' -> 'The answer is c.'"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."},
                ]
            }
        )
    return rows


def write_prompts(path: Path, n: int, seed: int) -> Path:
    """RL prompts (the user turns of `addition_conversations`) as a `prompt` jsonl file."""
    return write_jsonl(path, [{"prompt": r["messages"][0]["content"]} for r in addition_conversations(n, seed=seed)])


def stage_args(module: str, datamodule: str, model: str, data: str, output_dir: str | None, *extra: str) -> list[str]:
    """`fit` arguments for a tiny, quiet, CPU run of a training stage."""
    args = [
        "fit",
        f"--model={module}",
        f"--model.model.name_or_path={model}",
        f"--data={datamodule}",
        f"--data.data={data}",
        "--data.batch_size=8",
        "--data.val_fraction=0.25",
        "--trainer.accelerator=cpu",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--seed_everything=1",
    ]
    if output_dir is not None:
        args.append(f"--model.output_dir={output_dir}")
    return args + list(extra)


def sft_args(model: str, data: str, output_dir: str | None, *extra: str) -> list[str]:
    return stage_args("salsa_lightning.modules.sft.SFTModule", "salsa_lightning.data.sft.SFTDataModule",
                      model, data, output_dir, *extra)  # fmt: skip


def addition_preferences(n: int, seed: int = 0) -> list[dict]:
    """A separable toy preference set: the right sum beats an unrelated word salad."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"The answer is {a + b}.",
                "rejected": rng.choice(["banana banana fox", "lazy dog lazy dog", "HELLO WORLD"]),
            }
        )
    return rows


def reward_args(model: str, data: str, output_dir: str | None, *extra: str) -> list[str]:
    return stage_args("salsa_lightning.modules.reward.RewardModule",
                      "salsa_lightning.data.preferences.PreferenceDataModule", model, data, output_dir, *extra)  # fmt: skip


def fraction_of_a(prompts: list, responses: list[str]) -> list[float]:
    """A dense programmatic reward a tiny model can learn fast: the share of response characters that are 'a'."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def nan_reward(prompts: list, responses: list[str]) -> list[float]:
    return [float("nan")] * len(responses)


def ppo_args(
    policy: str, prompts: str, *extra: str, reward: str | None = None, reward_fn: str | None = None
) -> list[str]:
    args = [
        "fit",
        "--model=salsa_lightning.modules.ppo.PPOModule",
        f"--model.policy_init={policy}",
        "--model.ppo.mini_batch_size=4",
        "--model.generation.max_new_tokens=8",
        "--model.sample_table_every=0",
        "--data=salsa_lightning.data.prompts.PromptDataModule",
        f"--data.data={prompts}",
        "--data.batch_size=8",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--seed_everything=3",
    ]
    if reward is not None:
        args.append(f"--model.reward_model={reward}")
    if reward_fn is not None:
        args.append(f"--model.reward_fn={reward_fn}")
    return args + list(extra)


class KillAfterEpochs(Callback):
    """Stands in for a killed job: stops the run (after the epoch-end checkpoint) with the config unchanged."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class KillAfterBatches(Callback):
    """Stands in for a job killed mid-epoch: stops the run after its N-th training batch (after that batch's
    checkpoint, as Lightning runs checkpoint callbacks last)."""

    def __init__(self, batches: int):
        self.batches, self.seen = batches, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen >= self.batches:
            trainer.should_stop = True


def shorter_is_better(prompts: list, responses: list[str]) -> list[float]:
    """Pays for brevity: a policy optimising it collapses its responses, like the paper's KL-hack (§A.4)."""
    return [-len(r) / 10 for r in responses]
