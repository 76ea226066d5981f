"""salsa_lightning: the SALSA recipe (SFT seeds -> model soup -> reward model -> soup-anchored PPO) on Lightning."""

__version__ = "0.1.0"
