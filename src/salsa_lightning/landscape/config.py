"""`LandscapeConfig`: the fields of `python -m salsa_lightning landscape` (each docstring becomes its `--help`); the
generation and judging settings it shares with `evaluate` and the soup report are `JudgedGeneration`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from salsa_lightning.evaluation.llm_judge import LLMJudgeSpec
from salsa_lightning.evaluation.settings import JudgedGeneration

Reference = Literal["seed1", "seed2", "seed3", "soup"]


@dataclass
class LineGrid:
    """The line `(1 - α)θ₁ + αθ₂` between the first two seeds: `num` evenly spaced α from `start` to `stop`."""

    start: float = 0.0
    """First α (0 is seed 1; below 0 extrapolates beyond it and needs `extrapolate: true`)."""
    stop: float = 1.0
    """Last α (1 is seed 2; above 1 extrapolates beyond it and needs `extrapolate: true`)."""
    num: int = 5
    """How many α from `start` to `stop`, both included (0 for none: only `alphas`)."""
    alphas: list[float] = field(default_factory=list)
    """Extra α evaluated besides the grid (e.g. a closer look near a peak)."""


@dataclass
class PlaneGrid:
    """The plane of three seeds in barycentric coordinates `w = (w₁, w₂, w₃)`, `Σ w_i = 1`: `Σ_i w_i θ_i`."""

    step: float = 0.25
    """Grid spacing in barycentric units; 1/step must be a whole number, so that the seeds are grid points."""
    margin: float = 0.0
    """How far the grid reaches outside the triangle: every w_i >= -margin (> 0 needs `extrapolate: true`)."""
    points: list[list[float]] = field(default_factory=list)
    """Extra points [w₁, w₂, w₃], each summing to 1."""


@dataclass
class EvalFile:
    """One file of eval prompts (the landscape's and the soup report's; `evaluate` takes several splits)."""

    eval_file: str = "outputs/quickstart/data/eval_id.jsonl"
    """JSONL of evaluation prompts (`prompt` string/messages, or `messages`), or a Hub dataset's `test` split; the
    gold judge needs task-suite prompts."""


@dataclass
class LandscapeGrid:
    """The seeds and the points between and beyond them: `LandscapeConfig`'s leading fields."""

    seeds: list[str] = field(default_factory=list)
    """Two or three SFT outputs of one base (full weights or LoRA adapters): the line runs from the first to the
    second, the plane spans all three."""
    line: LineGrid | None = field(default_factory=LineGrid)
    """The α grid of the line between seeds 1 and 2 (null: no line)."""
    plane: PlaneGrid | None = None
    """The barycentric grid over the three seeds (null: no plane; needs three seeds)."""
    extrapolate: bool = False
    """Allow points outside the segment/triangle of the seeds (weights below 0 or above 1, still summing to 1)."""


@dataclass
class LandscapeConfig(JudgedGeneration, EvalFile, LandscapeGrid):  # the last base's fields first (JudgedGeneration)
    """Gold score / reward / llm-judge win rate over soups of two or three SFT seeds: a line and a plane, inside and
    beyond the seeds (paper Fig. 2), plus the soup report (each seed and the uniform soup: scores and KL between them)."""

    llm_judge: LLMJudgeSpec | None = None
    """The `llm` judge's endpoint, model, key variable and prompt template (needed when `judges` lists llm)."""
    llm_reference: Reference = "seed1"
    """What the llm judge compares every point with, prompt by prompt: `seed1`, `seed2`, `seed3` or `soup` (the
    uniform soup). Each point gets the mean of win 1 / tie ½ / loss 0 against it (`llm_win_vs_<reference>`); the
    reference's own value is ½ by definition (its responses against themselves, asked of no one)."""
    output_dir: str = "outputs/quickstart/landscape"
    """Where to write points.csv/json, the plots, the soup report, responses, judgements.jsonl, config.yaml and
    salsa_manifest.json."""
    overwrite: bool = False
    """Replace `output_dir` if it exists (the old one is removed only after the new one is complete)."""
    reuse_responses: bool = True
    """Take a point's responses and KL from the cache when its weights, the seeds' files, the prompts and the
    generation settings are unchanged: from `output_dir` when overwriting, and from `cache_dir`."""
    cache_dir: str | None = None
    """A response cache shared between runs (e.g. a finer grid in another `output_dir`), which also keeps the llm
    judge's replies (judgements.jsonl); default none."""
