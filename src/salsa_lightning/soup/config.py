"""`SoupConfig`: the fields of `python -m salsa_lightning soup` (each docstring becomes its `--help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from salsa_lightning.evaluation.settings import JudgedGeneration
from salsa_lightning.landscape.config import EvalFile

SoupJudge = Literal["gold", "reward"]


@dataclass
class SoupReport(JudgedGeneration, EvalFile):  # `eval_file` first (see JudgedGeneration)
    """Score each seed and the soup on eval prompts, and measure KL(soup ‖ seed), after the soup is written: the
    settings of `landscape` (less its grids and the llm judge, which compares points with a reference point: the
    landscape's soup report has it)."""

    judges: list[SoupJudge] = field(default_factory=lambda: ["gold"])
    """`gold`: the task suite's programmatic judge; `reward`: the mean reward of `reward_model`."""


@dataclass
class SoupConfig:
    """Average several SFT seeds into one model: the soup that SALSA uses as its KL anchor (paper eq. 3)."""

    inputs: list[str] = field(default_factory=list)
    """SFT output directories to average: full-weight HF models or PEFT LoRA adapters of one base model."""
    output_dir: str = "outputs/soup"
    """Where to write the soup (an HF model or PEFT adapter directory, plus config.yaml and salsa_manifest.json)."""
    weights: list[float] | None = None
    """One weight per input, summing to 1; default uniform. Give either `weights` or `alpha`."""
    alpha: float | None = None
    """Two inputs only: the weights become (1 - alpha, alpha), so 0 gives the first input and 1 the second."""
    mode: Literal["auto", "full", "lora"] = "auto"
    """`auto` detects full weights or LoRA adapters from the input files; `full`/`lora` insist on one."""
    lora_combination: Literal["cat", "approx_average"] = "cat"
    """`cat`: the exact soup W0 + Σ w_i s_i B_i A_i as one adapter of rank Σ r_i. `approx_average` averages A's and
    B's separately, which adds cross terms B_i A_j: not the soup, only for comparison (its error is recorded)."""
    merge: bool = False
    """LoRA inputs: fold the souped adapter into the base model's weights and write a full model instead."""
    allow_extrapolation: bool = False
    """Allow weights outside [0, 1] (still summing to 1), e.g. for the reward landscape beyond the seeds."""
    allow_nonfinite: bool = False
    """Soup inputs that hold NaN/inf anyway (they are refused by default, naming the tensor and file)."""
    verify_tolerance: float = 1e-4
    """Fail when a verified layer of the soup deviates from the dense weighted sum by more than this (relative)."""
    verify_samples: int = 8
    """How many layers (spread over the model) to verify densely at build time."""
    overwrite: bool = False
    """Replace `output_dir` if it exists (the old one is removed only after the new one is complete)."""
    report: SoupReport | None = None
    """Opt-in: after the soup is built, generate from each seed and the soup on eval prompts, score them, measure
    KL(soup ‖ seed), print the table and write soup_report.json/.md/.csv into `output_dir` (null: no report)."""
