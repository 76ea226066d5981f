"""`LandscapeConfig`: the fields of `python -m salsa_lightning landscape` (each docstring becomes its `--help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Judge = Literal["gold", "reward"]


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
class LandscapeConfig:
    """Gold score / reward over soups of two or three SFT seeds: a line and a plane, inside and beyond the seeds
    (paper Fig. 2), plus the soup report (each seed and the uniform soup: scores and KL between them)."""

    seeds: list[str] = field(default_factory=list)
    """Two or three SFT outputs of one base (full weights or LoRA adapters): the line runs from the first to the
    second, the plane spans all three."""
    line: LineGrid | None = field(default_factory=LineGrid)
    """The α grid of the line between seeds 1 and 2 (null: no line)."""
    plane: PlaneGrid | None = None
    """The barycentric grid over the three seeds (null: no plane; needs three seeds)."""
    extrapolate: bool = False
    """Allow points outside the segment/triangle of the seeds (weights below 0 or above 1, still summing to 1)."""
    eval_file: str = "outputs/quickstart/data/eval_id.jsonl"
    """JSONL of evaluation prompts (`prompt` string/messages, or `messages`); the gold judge needs task-suite ones."""
    limit: int | None = None
    """Use only the first `limit` prompts."""
    judges: list[Judge] = field(default_factory=lambda: ["gold"])
    """`gold`: the task suite's programmatic judge; `reward`: the mean reward of `reward_model`."""
    reward_model: str | None = None
    """Reward stage output, needed by the `reward` judge."""
    max_new_tokens: int = 128
    """Longest response; one that reaches it without an end-of-turn token is cut there."""
    max_prompt_length: int = 512
    """Longer prompts keep their last tokens."""
    batch_size: int = 16
    """Prompts per generation / scoring batch."""
    do_sample: bool = False
    """Sample instead of greedy decoding (greedy, the default, makes a run repeatable)."""
    temperature: float = 1.0
    """Sampling temperature when `do_sample` is on."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples of the prompts for each point's 95% interval."""
    seed: int = 0
    """Seed of the bootstrap (and of sampling when `do_sample` is on)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype of the models (auto = bfloat16 on a GPU that supports it, float32 otherwise)."""
    output_dir: str = "outputs/quickstart/landscape"
    """Where to write points.csv/json, the plots, the soup report, responses, config.yaml and salsa_manifest.json."""
    overwrite: bool = False
    """Replace `output_dir` if it exists (the old one is removed only after the new one is complete)."""
    reuse_responses: bool = True
    """Take a point's responses and KL from the cache when its weights, the seeds' files, the prompts and the
    generation settings are unchanged: from `output_dir` when overwriting, and from `cache_dir`."""
    cache_dir: str | None = None
    """A response cache shared between runs (e.g. a finer grid in another `output_dir`); default none."""
