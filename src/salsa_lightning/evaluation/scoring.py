"""Per-response numbers of every system's responses, filled into its `Responses`: KL to each reference (each
reference loaded once), the reward model's score, and the gold judge's score."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from salsa_lightning.data import judge as gold
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.generation import response_logprobs
from salsa_lightning.evaluation.kl import sequence_kl
from salsa_lightning.evaluation.responses import Responses
from salsa_lightning.evaluation.runtime import default_device, load_frozen_lm, release_memory
from salsa_lightning.evaluation.splits import SplitPrompts
from salsa_lightning.models.loading import canonical_model_ref


def measure_kl(
    cfg: EvalConfig,
    responses: dict[str, dict[str, Responses]],
    tokenizers: dict[tuple[str, str], Any],
    console: Console,
) -> None:
    """`res.kl[ref]`: KL(system ‖ ref) per response, for each of `cfg.kl_reference`, on the system's own responses
    (their `logp` must be set)."""
    for ref, path in (cfg.kl_reference or {}).items():
        # a system that IS the reference (the SFT init in the quickstart) has its own log-probs already: its
        # reference pass would repeat them exactly (same model, same batches), so it is skipped
        others = []
        for system, by_split in responses.items():
            if canonical_model_ref(cfg.systems[system]) != canonical_model_ref(path):
                others.append(system)
                continue
            for res in by_split.values():
                res.kl[ref] = sequence_kl(res.logp, res.logp).tolist()
        if not others:
            continue
        with console.status(f"KL to {ref}: loading {path}"):
            model = load_frozen_lm(path, cfg.dtype)
        with console.status(f"KL to {ref}"):
            for system in others:
                # the system's pad id, as in its own pass: the two passes then see identical batches
                pad_id = tokenizers[("System", system)].pad_token_id
                for res in responses[system].values():
                    ref_logp = response_logprobs(model, res.prompt_ids, res.token_ids, cfg.score_batch_size, pad_id)
                    res.kl[ref] = sequence_kl(res.logp, ref_logp).tolist()
        del model
        release_memory()


def score_rewards(cfg: EvalConfig, responses: dict[str, dict[str, Responses]], console: Console) -> None:
    """`res.reward`: the score of `cfg.reward_model` for each response."""
    from salsa_lightning.reward.scoring import RewardScorer

    with console.status(f"scoring with the reward model {cfg.reward_model}"):
        scorer = RewardScorer.from_output(
            cfg.reward_model, dtype=cfg.dtype, device=default_device(), batch_size=cfg.score_batch_size
        )
        for by_split in responses.values():
            for res in by_split.values():
                res.reward = scorer.score(res.prompts, res.texts).tolist()
    del scorer
    release_memory()


def score_gold(splits: dict[str, SplitPrompts], responses: dict[str, dict[str, Responses]]) -> None:
    """`res.gold`: the gold judge's score of each response to the user turn it answers."""
    for by_split in responses.values():
        for split, res in by_split.items():
            res.gold = [gold.score(p, r) for p, r in zip(splits[split].texts, res.texts, strict=True)]
