"""LightningModules: thin orchestration over `models/`, `data/`, `rl/` and `soup/`."""
