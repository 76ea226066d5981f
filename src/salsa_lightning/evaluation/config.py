"""`EvalConfig`: the fields of `python -m salsa_lightning evaluate` (each docstring becomes its `--help`); the
generation and judging settings it shares with `landscape` and the soup report are `settings.JudgedGeneration`'s."""

from __future__ import annotations

from dataclasses import dataclass, field

from salsa_lightning.evaluation.llm_judge import LLMJudgeSpec
from salsa_lightning.evaluation.settings import Judge, JudgedGeneration

__all__ = ["EvalConfig", "EvalSystems", "Judge"]


@dataclass
class EvalSystems:
    """The systems to compare and the prompts they answer: `EvalConfig`'s leading fields."""

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


@dataclass
class EvalConfig(JudgedGeneration, EvalSystems):  # EvalSystems last: its fields come first (see JudgedGeneration)
    """Generate responses from several systems on evaluation prompts and judge them pairwise (paper §4, Tables 2–4)."""

    reward_tie_margin: float = 0.0
    """The reward judge calls a tie when the two responses' rewards differ by at most this much (raw reward units)."""
    llm_judge: LLMJudgeSpec | None = None
    """The `llm` judge's endpoint, model, key variable and prompt template (needed when `judges` lists llm)."""
    kl_reference: dict[str, str] | None = None
    """Name -> model (e.g. {init: sft seed 1 output, soup: soup output}): each system's KL to it, Σ_t log π - log π_ref
    over its own responses' tokens, averaged over prompts."""
    plot_pair: list[str] | None = None
    """The two systems whose reward distributions are plotted (paper Fig. 3); default the first pair."""
    output_dir: str = "outputs/quickstart/eval"
    """Where to write tables, responses, the plot, config.yaml and salsa_manifest.json."""
    overwrite: bool = False
    """Replace `output_dir` if it exists (the old one is removed only after the new one is complete)."""
    reuse_responses: bool = True
    """With `overwrite`, take the responses of a system and split from the existing `output_dir` when the model
    files, the prompts and the generation settings are unchanged (re-judging without regenerating)."""
