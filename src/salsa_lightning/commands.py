"""Registers the recipe's non-training subcommands on the CLI (see `cli.register_command`)."""

from salsa_lightning.cli import register_command

# Filled in by the stages that provide them (data generation, soup, evaluation, landscape).
__all__ = ["register_command"]
