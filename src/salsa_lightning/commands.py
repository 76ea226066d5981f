"""Registers the recipe's non-training subcommands on the CLI (see `cli.register_command`)."""

from salsa_lightning.cli import register_command

register_command(
    "data",
    config="salsa_lightning.data.tasks:TaskSuiteConfig",
    run="salsa_lightning.data.tasks:run_data",
    help="Write the built-in task suite (SFT, preferences, RL prompts, ID/OOD eval) with its gold judge.",
)
register_command(
    "soup",
    config="salsa_lightning.soup.config:SoupConfig",
    run="salsa_lightning.soup.run:run_soup",
    help="Average several SFT seeds (full weights, or LoRA adapters exactly) into a model soup.",
)
register_command(
    "evaluate",
    config="salsa_lightning.evaluation.config:EvalConfig",
    run="salsa_lightning.evaluation.run:run_evaluate",
    help="Generate responses from several systems and judge them pairwise: win rates, KL, reward distributions.",
)
register_command(
    "export",
    config="salsa_lightning.checkpoints:ExportConfig",
    run="salsa_lightning.checkpoints:run_export",
    help="Convert an SFT or reward checkpoint (a .ckpt file, or a sharded FSDP2 checkpoint directory) into the "
    "HF-format stage output; an exported reward model has no training-set reward stats (normalize_reward refuses it).",
)
register_command(
    "landscape",
    config="salsa_lightning.landscape.config:LandscapeConfig",
    run="salsa_lightning.landscape.run:run_landscape",
    help="Gold score / reward over soups of two or three seeds, on a line and a plane, inside and beyond the seeds "
    "(paper Fig. 2), plus the soup report: each seed and the uniform soup, with the KL between them.",
)
