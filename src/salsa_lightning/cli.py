"""The command line: LightningCLI for training stages, plus the recipe's other steps on the same parser.

    python -m salsa_lightning fit --config configs/quickstart/sft.yaml --seed_everything 2
    python -m salsa_lightning soup --config configs/quickstart/soup.yaml
    python -m salsa_lightning --help          # lists every subcommand

`fit`/`validate`/... are LightningCLI's own (model and data by `class_path`, every field overridable,
`--print_config`). The extra subcommands (`data`, `soup`, `evaluate`, `export`, `landscape`) are not Trainer
methods, so LightningCLI cannot build them; we add their parsers (one dataclass each) to the same
subcommand group, so one `--help` shows everything, and run them without a Trainer.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from dataclasses import dataclass
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from salsa_lightning.errors import user_error
from salsa_lightning.stage import CHECKPOINT_KEY


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
        help="Convert an SFT or reward checkpoint (a .ckpt file, or a sharded FSDP2 checkpoint directory) into the "
        "HF-format stage output; an exported reward model has no training-set reward stats (normalize_reward refuses "
        "it).",
    ),
}


class StageConfigCallback(SaveConfigCallback):
    """Saves the resolved config to the log dir (Lightning's behaviour) and hands it to the module, which
    writes it into its stage output next to the weights."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # with no logger there is no log directory: don't drop config.yaml into the working directory
        self.save_to_log_dir = trainer.logger is not None
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if hasattr(pl_module, "resolved_config"):
            pl_module.resolved_config = self.parser.dump(self.config, skip_none=False)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # What `export` needs to write a stage output like the one `fit` writes, and a checkpoint lacks: the whole
        # resolved config (hyper_parameters hold the model's part only), the seed, the metrics. Plain data only, so
        # it loads with `torch.load(weights_only=True)`.
        from salsa_lightning.modules.common import current_seed, scalar_metrics

        checkpoint[CHECKPOINT_KEY] = {
            "resolved_config": self.parser.dump(self.config, skip_none=False),
            "seed": current_seed(),
            "metrics": scalar_metrics(trainer.callback_metrics),
        }


class SalsaCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", StageConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault(
            "trainer_defaults",
            {
                "callbacks": [lazy_instance(RichProgressBar)],
                "logger": lazy_instance(CSVLogger, save_dir="."),  # ./lightning_logs/version_N/metrics.csv
            },
        )
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One source of truth for the tokenizer: the model's. Data modules receive it at instantiation.
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # `--trainer.enable_progress_bar false` must also drop our default Rich bar, or Lightning refuses to start
        if config.get("enable_progress_bar") is False:
            defaults = self.trainer_defaults.get("callbacks", [])
            self.trainer_defaults = {
                **self.trainer_defaults,
                "callbacks": [c for c in defaults if not isinstance(c, ProgressBar)],
            }
        return super()._instantiate_trainer(config, callbacks)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        group = parser._subcommands_action
        for name, cmd in EXTRA_COMMANDS.items():
            sub = LightningArgumentParser(description=cmd.help)
            sub.add_argument("--config", action="config")
            sub.add_class_arguments(cmd.load(cmd.config), fail_untyped=True, sub_configs=True)
            _bare_bool_flags(sub, cmd.load(cmd.config))
            self._subcommand_parsers[name] = sub
            group.add_subcommand(name, sub, help=cmd.help)

    def _set_seed(self) -> None:
        if self.subcommand not in EXTRA_COMMANDS:
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if self.subcommand not in EXTRA_COMMANDS:
            return super().instantiate_classes()
        cmd = EXTRA_COMMANDS[self.subcommand]
        parser = self._subcommand_parsers[self.subcommand]
        init = parser.instantiate_classes(self.config[self.subcommand])
        cls = cmd.load(cmd.config)
        self.command_config = cls(**{f.name: init[f.name] for f in dataclasses.fields(cls) if f.name in init})
        self.model = self.datamodule = self.trainer = None

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand not in EXTRA_COMMANDS:
            return super()._run_subcommand(subcommand)
        cmd = EXTRA_COMMANDS[subcommand]
        self.result = cmd.load(cmd.run)(self.command_config)


def _bare_bool_flags(parser: LightningArgumentParser, cls: type) -> None:
    """Let a boolean field be given as a bare flag (`--overwrite`), as in most CLIs, besides `--overwrite true`."""
    booleans = {name for name, hint in typing.get_type_hints(cls).items() if hint is bool}
    for action in parser._actions:
        if action.dest in booleans:
            action.nargs, action.const = "?", True


def _tokenizer_of(model: Any) -> Any:
    return getattr(model, "tokenizer", None)


def _has_omegaconf() -> bool:
    return importlib.util.find_spec("omegaconf") is not None


def _enable_attribute_docstrings() -> None:
    # dataclass field docstrings (a string under each field) become `--help` text
    try:
        from jsonargparse import set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (ImportError, TypeError):  # older jsonargparse: help text without field docs
        pass


def cli_main(args: list[str] | None = None, **kwargs: Any) -> SalsaCLI:
    """Run the CLI with `args` (default: sys.argv[1:]); callable from tests and notebooks.

    A `SalsaError` (a problem the user can fix) propagates; `main()` turns it into one line and exit 2.
    """
    _enable_attribute_docstrings()
    return SalsaCLI(args=args, **kwargs)


def main(args: list[str] | None = None) -> None:
    try:
        cli_main(args)
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
