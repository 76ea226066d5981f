"""How many rollouts a PPO run makes, so that the learning-rate schedule (stepped once per rollout) spans the run
whichever limit ends it.

Under manual optimisation Lightning counts every `optimizer.step()` toward `trainer.max_steps`: one PPO rollout
takes `ppo_epochs × ceil(rows / mini_batch_size)` of them, while `max_epochs` counts rollouts (batches). Lightning's
`estimated_stepping_batches` mixes the two units, so it cannot size the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from salsa_lightning.errors import SalsaError


def optimizer_steps_per_rollout(rows: int, ppo_epochs: int, mini_batch_size: int) -> int:
    """`ppo_epochs` passes of `ceil(rows / mb)` minibatches (mb = min(mini_batch_size, rows))."""
    return ppo_epochs * math.ceil(rows / min(mini_batch_size, rows)) if rows > 0 else 0


def rollouts_in_run(
    batch_rows: Sequence[int], max_epochs: int | None, max_steps: int | None, ppo_epochs: int, mini_batch_size: int
) -> int:
    """The number of rollouts (training steps) before the first limit is reached.

    `batch_rows`: rows of each batch of one epoch (per process). `max_epochs` None or -1: no epoch limit;
    `max_steps` None or -1: no step limit (optimizer steps). At least 1.
    """
    epochs = math.inf if max_epochs is None or max_epochs < 0 else max_epochs
    if not batch_rows or epochs == 0:
        return 1
    if max_steps is None or max_steps < 0:
        return max(1, int(len(batch_rows) * epochs)) if epochs != math.inf else 1
    steps = [optimizer_steps_per_rollout(rows, ppo_epochs, mini_batch_size) for rows in batch_rows]
    per_epoch = sum(steps)
    if per_epoch == 0:
        return 1
    full = min(epochs, (max_steps - 1) // per_epoch if max_steps > 0 else 0)  # whole epochs that stay below the limit
    rollouts, done = int(full) * len(steps), int(full) * per_epoch
    if full == epochs:
        return max(1, rollouts)
    for s in steps:  # the epoch in which the step limit is reached
        rollouts, done = rollouts + 1, done + s
        if done >= max_steps:
            break
    return max(1, rollouts)


def epoch_batch_rows(trainer) -> list[int] | None:
    """Rows per batch of one training epoch on this process, from the trainer's prepared dataloader; None when it
    cannot be known (an iterable dataset)."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # as Lightning's own `estimated_stepping_batches` does when it needs the data
    loader = trainer.train_dataloader
    batches = trainer.num_training_batches
    size = getattr(loader, "batch_size", None)
    sampler = getattr(loader, "sampler", None)
    if size is None or sampler is None or not hasattr(sampler, "__len__") or batches == math.inf:
        return None
    n = len(sampler)
    return [min(size, n - i * size) for i in range(int(batches))]


def schedule_length(trainer, ppo) -> int:
    """Rollouts in the run the trainer is set up for: what a per-rollout LR schedule must span (`ppo`: the PPOSpec;
    each prompt of a batch becomes `n_samples_per_prompt` rollout rows)."""
    ppo_epochs, mini_batch_size, samples_per_prompt = ppo.ppo_epochs, ppo.mini_batch_size, ppo.n_samples_per_prompt
    rows = [r * samples_per_prompt for r in epoch_batch_rows(trainer) or []]
    if rows:
        return rollouts_in_run(rows, trainer.max_epochs, trainer.max_steps, ppo_epochs, mini_batch_size)
    # an iterable dataset of unknown length: only a step limit (in optimizer steps) sizes the run
    size = getattr(trainer.train_dataloader, "batch_size", None)
    if trainer.max_steps and trainer.max_steps > 0 and size:
        size *= samples_per_prompt
        return max(1, math.ceil(trainer.max_steps / optimizer_steps_per_rollout(size, ppo_epochs, mini_batch_size)))
    raise SalsaError(
        "The PPO prompt data has no known length, so the learning-rate schedule cannot be sized; set "
        "`--trainer.max_steps` (optimizer steps: ppo_epochs x minibatches per rollout)."
    )


__all__ = ["epoch_batch_rows", "schedule_length", "optimizer_steps_per_rollout", "rollouts_in_run"]
