"""The run's seed, as `--seed_everything` set it: below every module that needs it (data order, stage outputs)."""

from __future__ import annotations

import os


def current_seed() -> int | None:
    """The seed `--seed_everything` set (Lightning exports it as PL_GLOBAL_SEED)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None
