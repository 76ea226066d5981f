"""`EvalConfig`: the fields of `python -m salsa_lightning evaluate` (each docstring becomes its `--help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from salsa_lightning.evaluation.llm_judge import LLMJudgeSpec

Judge = Literal["gold", "reward", "llm"]


@dataclass
class EvalConfig:
    """Generate responses from several systems on evaluation prompts and judge them pairwise (paper §4, Tables 2–4)."""

    systems: dict[str, str] = field(default_factory=dict)
    """System name -> stage output directory or model id, e.g. {salsa: outputs/salsa, ppo: outputs/ppo, sft: ...}."""
    pairs: list[list[str]] | None = None
    """Pairs [a, b] to judge (verdicts from a's point of view); default every pair of `systems` in their order."""
    eval_files: dict[str, str] = field(default_factory=dict)
    """Split name -> prompts: a local JSON/JSONL/Parquet file or a Hub dataset, e.g. {id: .../eval_id.jsonl,
    mt_bench: HuggingFaceH4/mt_bench_prompts}."""
    hub_splits: dict[str, str] = field(default_factory=dict)
    """Split name -> the split of its Hub dataset to read (default `test`), e.g. {mt_bench: train}; local files
    have one split and ignore this."""
    prompt_columns: dict[str, str] = field(default_factory=dict)
    """Split name -> the column holding its prompts (default `prompt`, else `messages`), e.g. {arena_hard: turns}.
    A string is one user turn; a list of strings or {content} dicts is a list of user turns, where turn k is
    generated after the system's own answers to the turns before it and every turn is judged (MT-Bench's two
    turns); a list of {role, content} messages is a prompt up to its first assistant turn."""
    judges: list[Judge] = field(default_factory=lambda: ["gold"])
    """`gold`: the task suite's programmatic judge; `reward`: the reward model's scores (a tie within a margin);
    `llm`: a chat model over an OpenAI-compatible endpoint (`llm_judge`), both orders asked (a tie when they disagree)."""
    reward_model: str | None = None
    """Reward stage output: needed by the `reward` judge; also gives each system's mean reward and the plot."""
    reward_tie_margin: float = 0.0
    """The reward judge calls a tie when the two responses' rewards differ by at most this much (raw reward units)."""
    llm_judge: LLMJudgeSpec | None = None
    """The `llm` judge's endpoint, model, key variable and prompt template (needed when `judges` lists llm)."""
    max_new_tokens: int = 128
    """Longest response; one that reaches it without an end-of-turn token is cut there."""
    max_prompt_length: int = 512
    """Longer prompts keep their last tokens (counted in results.json)."""
    batch_size: int = 16
    """Prompts per generation / scoring batch."""
    do_sample: bool = False
    """Sample instead of greedy decoding (greedy, the default, makes a run repeatable)."""
    temperature: float = 1.0
    """Sampling temperature when `do_sample` is on."""
    limit: int | None = None
    """Use only the first `limit` prompts of each split (every turn of each)."""
    kl_reference: dict[str, str] | None = None
    """Name -> model (e.g. {init: sft seed 1 output, soup: soup output}): each system's KL to it, Σ_t log π - log π_ref
    over its own responses' tokens, averaged over prompts."""
    plot_pair: list[str] | None = None
    """The two systems whose reward distributions are plotted (paper Fig. 3); default the first pair."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples of the prompts for the 95% intervals of the win rates."""
    seed: int = 0
    """Seed of the bootstrap (and of sampling when `do_sample` is on)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype of every model loaded (auto = bfloat16 on a GPU that supports it, float32 otherwise)."""
    output_dir: str = "outputs/quickstart/eval"
    """Where to write tables, responses, the plot, config.yaml and salsa_manifest.json."""
    overwrite: bool = False
    """Replace `output_dir` if it exists (the old one is removed only after the new one is complete)."""
    reuse_responses: bool = True
    """With `overwrite`, take the responses of a system and split from the existing `output_dir` when the model
    files, the prompts and the generation settings are unchanged (re-judging without regenerating)."""
