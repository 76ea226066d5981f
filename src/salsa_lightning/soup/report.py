"""The soup report (the `soup` stage's opt-in `report:`): each seed and the soup on eval prompts — mean gold score /
reward with bootstrap 95% intervals, KL(soup ‖ seed) and KL(seed ‖ soup) — as a table and soup_report.json/.md/.csv.

It is the landscape at its labelled points and nothing else: the seeds are the vertices (one-hot weights), the soup
the point at the soup's weights; one in-memory model set to each in turn through the soup API
(`landscape.models`), generated from, judged and measured by the landscape's own functions (`landscape.points`; the
settings checked and the prompts loaded by `landscape.run`'s), and tabulated by `landscape.report`. So a landscape's
soup report and this one are the same numbers for the same seeds.

Its judges are `gold` and `reward`; the llm judge is left out (`report.judges` refuses it). `landscape` with
`judges: [..., llm]` gives the seeds and the soup their llm win rate against `llm_reference`, in its points and in
its soup report.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console

from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.generation import encode_prompts
from salsa_lightning.evaluation.settings import generation_settings
from salsa_lightning.landscape import report as tables
from salsa_lightning.landscape.config import LandscapeConfig
from salsa_lightning.landscape.grid import Point
from salsa_lightning.landscape.points import PointRun, generate_points, score_points
from salsa_lightning.landscape.run import load_eval_prompts, validate_judging
from salsa_lightning.models.loading import canonical_model_ref, load_tokenizer
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.soup.config import SoupConfig


@dataclass
class ReportPlan:
    """A checked `report:` block: its settings in the landscape's terms (no grid) and the prompts, loaded."""

    settings: LandscapeConfig
    prompts: Any
    """evaluate's `SplitPrompts`: the rows, their messages and the user turns the gold judge reads."""


def plan_report(cfg: SoupConfig, input_format: str) -> ReportPlan:
    """Check `cfg.report` and load its prompts, before any soup is built: one sentence naming a bad file, judge,
    reward model or setting, and its fix."""
    rep = cfg.report
    if input_format == "lora" and cfg.lora_combination != "cat":
        raise SalsaError(
            "`report` measures the exact soup, but `lora_combination: approx_average` writes another adapter; set "
            "`lora_combination: cat` or `report: null`."
        )
    shared = {f.name: getattr(rep, f.name) for f in fields(rep)}  # JudgedGeneration's and eval_file
    settings = LandscapeConfig(seeds=list(cfg.inputs), line=None, plane=None, extrapolate=cfg.allow_extrapolation,
                               output_dir=cfg.output_dir, **shared)  # fmt: skip
    try:
        validate_judging(settings, judges=("gold", "reward"))  # the llm judge needs a reference point
        prompts = load_eval_prompts(rep.eval_file, rep.limit, "gold" in rep.judges)
    except SalsaError as err:
        raise SalsaError(f"In the soup's `report`: {err}") from err
    return ReportPlan(settings, prompts)


def report_points(n: int, weights: list[float]) -> list[Point]:
    """Seed 1..n (one-hot weights) and the soup (its own weights, as built), in the table's order."""
    seeds = [Point(tuple(1.0 if j == i else 0.0 for j in range(n)), label=f"seed{i + 1}") for i in range(n)]
    return [*seeds, Point(tuple(float(w) for w in weights), label="soup")]


def write_report(plan: ReportPlan, weights: list[float], directory: Path, console: Console) -> dict[str, Any]:
    """Generate from every seed and the soup, judge, measure the KLs; write soup_report.json/.md/.csv into
    `directory` (the soup's output, still in its temporary directory). Returns the JSON's dict plus `files`;
    `soup_table(result["rows"])` is the table to print."""
    s = plan.settings
    n = len(s.seeds)
    runs = [PointRun(p, key=p.label) for p in report_points(n, weights)]
    tokenizer = load_tokenizer(ModelSpec(s.seeds[0]), padding_side="left")
    prompt_ids, truncated = encode_prompts(tokenizer, plan.prompts.messages, s.max_prompt_length)
    generate_points(s, runs, prompt_ids, tokenizer, console, soup_weights=runs[-1].point.weights)
    score_points(s, plan.prompts, runs, console)
    records = [tables.point_record(r, s.bootstrap_samples, s.seed) for r in runs]
    rows = tables.soup_report(records, n)
    about = {
        "seeds": [canonical_model_ref(p) for p in s.seeds],
        "prompts": {"source": plan.prompts.source, "n": len(plan.prompts.rows), "truncated": truncated},
        "judges": list(s.judges),
        "reward_model": canonical_model_ref(s.reward_model) if s.reward_model else None,
        "generation": generation_settings(s),
        "bootstrap": {"samples": s.bootstrap_samples, "seed": s.seed, "confidence": 0.95},
    }
    files = tables.write_soup_report(directory, rows, n, about)
    return {"rows": rows, **about, "files": files}


soup_table = tables.soup_table
