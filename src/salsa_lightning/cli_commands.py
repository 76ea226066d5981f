"""The recipe's non-training subcommands (`data`, `soup`, `evaluate`, `landscape`, `export`): one literal registry
that `cli` adds to LightningCLI's subcommand group; each names its config dataclass and its run function by import
path, so nothing is imported until the command runs (or its `--help` is built)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ExtraCommand:
    config: str  # "module:DataclassName"
    run: str  # "module:function" taking the config instance
    help: str

    def load(self, ref: str):
        module, name = ref.split(":")
        return getattr(importlib.import_module(module), name)


# The recipe's non-training subcommands: one literal registry (nothing registers itself from elsewhere). Each
# dataclass's fields become the command's flags and YAML keys.
EXTRA_COMMANDS: dict[str, ExtraCommand] = {
    "data": ExtraCommand(
        config="salsa_lightning.data.tasks:TaskSuiteConfig",
        run="salsa_lightning.data.tasks:run_data",
        help="Write the built-in task suite (SFT, preferences, RL prompts, ID/OOD eval) with its gold judge.",
    ),
    "soup": ExtraCommand(
        config="salsa_lightning.soup.config:SoupConfig",
        run="salsa_lightning.soup.run:run_soup",
        help="Average several SFT seeds (full weights, or LoRA adapters exactly) into a model soup.",
    ),
    "evaluate": ExtraCommand(
        config="salsa_lightning.evaluation.config:EvalConfig",
        run="salsa_lightning.evaluation.run:run_evaluate",
        help="Generate responses from several systems and judge them pairwise: win rates, KL, reward distributions.",
    ),
    "landscape": ExtraCommand(
        config="salsa_lightning.landscape.config:LandscapeConfig",
        run="salsa_lightning.landscape.run:run_landscape",
        help="Gold score / reward over soups of two or three seeds, on a line and a plane, inside and beyond the "
        "seeds (paper Fig. 2), plus the soup report: each seed and the uniform soup, with the KL between them.",
    ),
    "export": ExtraCommand(
        config="salsa_lightning.checkpoints:ExportConfig",
        run="salsa_lightning.checkpoints:run_export",
        help="Convert an SFT, reward or PPO checkpoint (a .ckpt file, or a sharded FSDP2 checkpoint directory) into the "
        "HF-format stage output; an exported reward model has no training-set reward stats (normalize_reward refuses "
        "it).",
    ),
}
