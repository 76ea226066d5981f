"""`JudgedGeneration`: the settings of every stage that generates responses to eval prompts and judges them
(`evaluate`, `landscape`, the soup's `report`), in one dataclass that their configs inherit, so the three share one
set of YAML keys, defaults and `--help` texts; and `generation_settings`, the part of them that decides the
responses, which their response caches are keyed by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from salsa_lightning.vllm_engine import Backend, VllmSpec

Judge = Literal["gold", "reward", "llm"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class JudgedGeneration:
    """How responses to the eval prompts are generated and judged (each field's docstring becomes its `--help`).

    A config that inherits it keeps its own fields in front by listing its own leading dataclass LAST among its
    bases: dataclass fields follow the reversed MRO, so `class C(JudgedGeneration, Head)` orders Head's fields,
    these, then C's own — the order of `--help`, `--print_config` and the saved config.yaml."""

    limit: int | None = None
    """Use only the first `limit` prompts (of each split in `evaluate`, with every turn of each; null: all)."""
    judges: list[Judge] = field(default_factory=lambda: ["gold"])
    """`gold`: the task suite's programmatic judge; `reward`: the reward model's scores (`evaluate`: a tie within
    `reward_tie_margin`); `llm`: a chat model over an OpenAI-compatible endpoint (`llm_judge`), both orders asked (a
    tie when they disagree)."""
    reward_model: str | None = None
    """Reward stage output: needed by the `reward` judge; when set, every response's reward is measured."""
    max_new_tokens: int = 128
    """Longest response; one that reaches it without an end-of-turn token is cut there."""
    max_prompt_length: int = 512
    """Longer prompts keep their last tokens (how many were cut is recorded in the output)."""
    batch_size: int = 16
    """Prompts per generation batch (decoding a small model is bound by per-step overhead: larger batches help)."""
    score_batch_size: int = 16
    """Rows per forward when responses are scored (their log-probs for the KL, the reward model), longest first:
    these forwards are bound by compute, so smaller batches of similar lengths spend less of it on padding."""
    do_sample: bool = False
    """Sample instead of greedy decoding (greedy, the default, makes a run repeatable)."""
    temperature: float = 1.0
    """Sampling temperature when `do_sample` is on."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples of the prompts for each 95% interval (of a win rate or a mean score)."""
    seed: int = 0
    """Seed of the bootstrap (and of sampling when `do_sample` is on)."""
    dtype: DType = "auto"
    """Weight dtype of every model loaded (auto = bfloat16 on a GPU that supports it, float32 otherwise)."""
    backend: Backend = "hf"
    """Who generates the responses: `hf` (transformers' `generate`) or `vllm` (a vLLM engine in this process: adapter
    systems on one base share one engine; needs `make install VLLM=1`). Scores and log-probs are computed alike."""
    vllm: VllmSpec = field(default_factory=VllmSpec)
    """The vLLM engine's settings (`backend: vllm` only)."""


def generation_settings(cfg: JudgedGeneration) -> dict[str, Any]:
    """What in `cfg` decides a model's responses to given prompts and their log-probs: part of the response cache
    keys of `evaluate` (with the model and prompts) and `landscape` (with the weights, prompts and device)."""
    return {
        "dtype": cfg.dtype,
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_length": cfg.max_prompt_length,
        "do_sample": cfg.do_sample,
        "temperature": cfg.temperature if cfg.do_sample else None,
        "seed": cfg.seed if cfg.do_sample else None,
        # batching changes greedy results only at the rounding level, but it does change them
        "batch_size": cfg.batch_size,
        # another engine's numerics give other greedy responses (absent for hf: earlier caches stay valid)
        **({"backend": cfg.backend} if cfg.backend != "hf" else {}),
    }
