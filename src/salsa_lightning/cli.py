"""The command line: LightningCLI for training stages, plus the recipe's other steps on the same parser.

    python -m salsa_lightning fit --config configs/quickstart/sft.yaml --seed_everything 2
    python -m salsa_lightning soup --config configs/quickstart/soup.yaml
    python -m salsa_lightning --help          # lists every subcommand

`fit`/`validate`/`test` are LightningCLI's own (model and data by `class_path` or class name, every field
overridable, `--print_config`); `validate` and `test` report SFT perplexity and reward-model accuracy. The extra
subcommands (`data`, `soup`, `evaluate`, `export`, `landscape`) are not Trainer methods, so LightningCLI cannot
build them; we add their parsers (one dataclass each) to the same subcommand group, so one `--help` shows
everything, and run them without a Trainer.

Their registry is `cli_commands`; the parser and its one-sentence errors `cli_parser`; what a resume reads from its
checkpoint `cli_resume`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from salsa_lightning.cli_commands import EXTRA_COMMANDS, ExtraCommand
from salsa_lightning.cli_parser import (
    SalsaParser,
    bare_bool_flags,
    config_error_sentence,
    enable_attribute_docstrings,
    keep_nested_nulls,
)
from salsa_lightning.cli_resume import check_ckpt_path, checkpoint_model_arg
from salsa_lightning.errors import SalsaError, user_error
from salsa_lightning.stage import CHECKPOINT_KEY

# the public names, those that moved to cli_commands and cli_parser still importable from here
__all__ = [
    "EXTRA_COMMANDS",
    "ExtraCommand",
    "SalsaCLI",
    "SalsaParser",
    "StageConfigCallback",
    "cli_main",
    "config_error_sentence",
    "main",
]

# Imported before parsing, so that `--model PPOModule` and `--model.help PPOModule` resolve by class name (jsonargparse
# looks a short name up among the subclasses already imported); cheap: none of them imports a model library.
STAGE_MODULES = (
    "salsa_lightning.modules.sft",
    "salsa_lightning.modules.reward",
    "salsa_lightning.modules.ppo",
    "salsa_lightning.data.sft",
    "salsa_lightning.data.preferences",
    "salsa_lightning.data.prompts",
)


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
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `predict` is hidden: no stage has a predict_step (`evaluate` generates and scores)
        skip = LightningCLI.subcommands()
        return {name: skip[name] for name in ("fit", "validate", "test")}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for module in STAGE_MODULES:
            importlib.import_module(module)
        _hide_lightning_tips()
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
        kwargs.setdefault("parser_class", SalsaParser)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One source of truth for the tokenizer: the model's. Data modules receive it at instantiation.
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate")

    def _add_arguments(self, parser: LightningArgumentParser) -> None:
        super()._add_arguments(parser)
        for action in parser._actions:  # LightningCLI's own `--optimizer`/`--lr_scheduler`: say what to use instead
            if action.dest in {"optimizer", "lr_scheduler"}:
                action.help = f"Not supported ({_OPTIM_INSTEAD})."

    def before_instantiate_classes(self) -> None:
        if self.subcommand in EXTRA_COMMANDS:
            return
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        given = [f"--{key}" for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
        if given:
            raise SalsaError(f"{' and '.join(given)} cannot be used here: {_OPTIM_INSTEAD}.")
        if self.subcommand in {"validate", "test"} and config.get("model") is not None:
            step = "validation_step" if self.subcommand == "validate" else "test_step"
            module, name = config.model.class_path.rsplit(".", 1)
            cls = getattr(importlib.import_module(module), name)
            if getattr(cls, step) is getattr(LightningModule, step):
                raise SalsaError(
                    f"`{self.subcommand}` scores SFT models (perplexity) and reward models (pairwise accuracy); "
                    f"{cls.__name__} has no {step}, so use `evaluate` for policies."
                )
            # these write no stage output: an existing (or seed-templated) output_dir is no reason to refuse
            if "output_dir" in config.model.init_args:
                config.model.init_args.output_dir = None

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
            sub = SalsaParser(description=cmd.help)
            sub.add_argument("--config", action="config")
            sub.add_class_arguments(cmd.load(cmd.config), fail_untyped=True, sub_configs=True)
            bare_bool_flags(sub, cmd.load(cmd.config))
            self._subcommand_parsers[name] = sub
            group.add_subcommand(name, sub, help=cmd.help)

    def _set_seed(self) -> None:
        if self.subcommand not in EXTRA_COMMANDS:
            super()._set_seed()

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._given_args = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """A resume takes the checkpoint's model hyper-parameters as its base, and what the user gives wins.

        Lightning (2.6) merges the checkpoint's hyper-parameters over the parsed config, so that a checkpoint alone
        rebuilds its model; but that silently undid every `--model.*` option and config-file value given for the
        resume (a new `--model.output_dir` was ignored: the output went to the old path). Here they are parsed as
        the first `--model` value, before everything the user typed, so any later option or `--config` wins."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if sub and sub not in EXTRA_COMMANDS:
            check_ckpt_path(ckpt_path)  # missing, no checkpoint, or a pickle that runs code: one sentence first
        args = self._given_args
        if not ckpt_path or not Path(ckpt_path).is_file() or not isinstance(args, list) or sub not in args:
            return  # nothing to merge (a sharded checkpoint directory holds no hyper-parameters); or args as a dict
        model_arg = checkpoint_model_arg(ckpt_path, self.config[sub].get("model"))
        if model_arg is None:
            return
        at = args.index(sub) + 1
        self.config = self.parser.parse_args([*args[:at], model_arg, *args[at:]])

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


_OPTIM_INSTEAD = (
    "every stage builds AdamW with a warmup schedule from `model.optim`; set e.g. `--model.optim.lr 1e-5` or "
    "`--model.optim.schedule cosine` instead"
)


def _tokenizer_of(model: Any) -> Any:
    return getattr(model, "tokenizer", None)


def _hide_lightning_tips() -> None:
    """Drop Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines, an advertisement on every run."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in log.filters):
            log.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _has_omegaconf() -> bool:
    return importlib.util.find_spec("omegaconf") is not None


def cli_main(args: list[str] | None = None, **kwargs: Any) -> SalsaCLI:
    """Run the CLI with `args` (default: sys.argv[1:]); callable from tests and notebooks.

    A `SalsaError` (a problem the user can fix) propagates; `main()` turns it into one line and exit 2.
    """
    from salsa_lightning.allocator import pin_mmap_threshold

    pin_mmap_threshold()  # only with SALSA_MMAP_THRESHOLD set (see allocator.py)
    enable_attribute_docstrings()
    keep_nested_nulls()
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
