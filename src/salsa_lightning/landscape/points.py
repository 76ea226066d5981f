"""One point of the landscape (or row of the soup report) and the model work on it: its responses and own log-probs
from one in-memory model of the seeds set to each point in turn, its KL to each reference it needs (seed 1, the
uniform soup, and every seed for the soup itself), its reward and gold score."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console

from salsa_lightning.data import judge as gold
from salsa_lightning.evaluation.engines import engine_responses, hand_over_soup, soup_engine, stop_ids
from salsa_lightning.evaluation.generation import generate_responses, response_logprobs
from salsa_lightning.evaluation.kl import sequence_kl
from salsa_lightning.evaluation.runtime import default_device, progress_bar, release_memory
from salsa_lightning.landscape.config import LandscapeConfig
from salsa_lightning.landscape.grid import Point, point_key
from salsa_lightning.landscape.models import soup_model


@dataclass
class PointRun:
    """One point's responses and per-prompt numbers."""

    point: Point
    key: str
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    kl: dict[str, list[float]] = field(default_factory=dict)
    """reference label (`seed1`, `soup`, …) -> per-prompt Σ_t log π_point - log π_ref on the point's responses."""
    reused: bool = False
    logp: list[torch.Tensor] | None = None
    gold: list[float] | None = None
    reward: list[float] | None = None
    llm: list[str] | None = None
    """The llm judge's verdict per prompt on the point's response against the reference point's (`llm_reference`):
    win / loss / tie, or unparseable / failed (counted, never a tie); `landscape.judging`."""


def references(point: Point, n: int) -> list[str]:
    """The KL references a point is measured against: seed 1 and the soup; the soup also against every seed."""
    return ["seed1", "soup"] + ([f"seed{i + 1}" for i in range(1, n)] if point.label == "soup" else [])


def reference_weights(label: str, n: int) -> tuple[float, ...]:
    if label == "soup":
        return point_key([1.0 / n] * n)
    i = int(label.removeprefix("seed")) - 1
    return point_key([1.0 if j == i else 0.0 for j in range(n)])


def generate_points(
    cfg: LandscapeConfig, runs: list[PointRun], prompt_ids, tokenizer, console: Console, soup_weights=None
) -> None:
    """Responses and own log-probs of every point in `runs`, then their KL to each reference it needs (`references`),
    all from one in-memory model of `cfg.seeds`. The reference `soup` is the uniform soup unless `soup_weights`."""
    n = len(cfg.seeds)
    ref_weights = {f"seed{i + 1}": reference_weights(f"seed{i + 1}", n) for i in range(n)}
    ref_weights["soup"] = tuple(soup_weights) if soup_weights is not None else reference_weights("soup", n)
    with console.status(f"loading the seeds {', '.join(cfg.seeds)}"):
        soup = soup_model(cfg.seeds, cfg.dtype, default_device(), cfg.extrapolate)
    pad = tokenizer.pad_token_id
    engine = None
    if cfg.backend == "vllm":  # one engine for every point, handed each point's weights in memory
        with console.status("starting the vLLM engine"):
            engine, model_dir = soup_engine(soup, cfg, cfg.seeds)
        stop = stop_ids(tokenizer, model_dir)
    with progress_bar(console) as progress:
        task = progress.add_task("points", total=len(runs))
        for run in runs:
            soup.set_weights(run.point.weights)
            with torch.random.fork_rng(devices=[]):  # each point's samples independent of which ran before
                torch.manual_seed(cfg.seed)
                if engine is not None:
                    hand_over_soup(engine, soup)
                    generated = engine_responses(engine, tokenizer, prompt_ids, cfg, stop)
                else:
                    generated = generate_responses(soup.model, tokenizer, prompt_ids, cfg.max_new_tokens,
                                                   cfg.batch_size, cfg.do_sample, cfg.temperature)  # fmt: skip
            run.texts = [g.text for g in generated]
            run.token_ids = [g.token_ids for g in generated]
            run.finished = [g.finished for g in generated]
            run.logp = response_logprobs(soup.model, prompt_ids, run.token_ids, cfg.score_batch_size, pad)
            progress.advance(task)
        labels = list(dict.fromkeys(ref for run in runs for ref in references(run.point, n)))
        task = progress.add_task("KL references", total=len(labels))
        for label in labels:
            soup.set_weights(ref_weights[label])
            for run in runs:
                if label in references(run.point, n):
                    ref_logp = response_logprobs(soup.model, prompt_ids, run.token_ids, cfg.score_batch_size, pad)
                    run.kl[label] = sequence_kl(run.logp, ref_logp).tolist()
            progress.advance(task)
    if engine is not None:
        engine.close()
    del soup
    release_memory()


def score_points(cfg: LandscapeConfig, prompts, runs: list[PointRun], console: Console) -> None:
    """Each run's per-prompt reward (when `cfg.reward_model` is set) and gold score (when `gold` is a judge)."""
    if cfg.reward_model:
        from salsa_lightning.reward.scoring import RewardScorer

        with console.status(f"scoring with the reward model {cfg.reward_model}"):
            scorer = RewardScorer.from_output(
                cfg.reward_model, dtype=cfg.dtype, device=default_device(), batch_size=cfg.score_batch_size
            )
            for run in runs:
                run.reward = scorer.score(prompts.messages, run.texts).tolist()
        del scorer
        release_memory()
    if "gold" in cfg.judges:
        for run in runs:
            run.gold = [gold.score(p, r) for p, r in zip(prompts.texts, run.texts, strict=True)]
