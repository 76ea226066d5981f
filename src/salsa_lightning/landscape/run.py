"""`run_landscape`: the `landscape` stage — seeds and prompts in, one self-describing output directory out.

1. check everything that needs no model (seeds, grids, judges, paths, that the gold judge parses every prompt, that
   the llm judge's key is set and its endpoint answers);
2. take each point's responses and KL from the cache when the key (seeds' files, weights, prompts, generation
   settings) matches; otherwise set the one in-memory model to that soup, generate, and keep its log-probs;
3. for each KL reference (seed 1, the uniform soup, and every seed for the soup's own row), set the model to it
   and score the new points' responses: `KL(point ‖ ref)` on the point's own responses (`evaluation.kl`);
4. score with the reward model and the gold judge; write the response cache; ask the llm judge about every point
   against `llm_reference` (cached replies reused: `landscape.judging`); bootstrap intervals; tables, plots,
   manifest; rename into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from rich.console import Console

from salsa_lightning import __version__
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.checks import check_generation_settings, check_judges
from salsa_lightning.evaluation.generation import encode_prompts
from salsa_lightning.evaluation.judging import JUDGEMENTS, connect_llm_judge, llm_note
from salsa_lightning.evaluation.runtime import default_device, model_signature
from salsa_lightning.evaluation.settings import generation_settings
from salsa_lightning.evaluation.splits import load_split
from salsa_lightning.landscape import report
from salsa_lightning.landscape.config import LandscapeConfig
from salsa_lightning.landscape.grid import Point, landscape_points
from salsa_lightning.landscape.judging import judge_points, share_judgements
from salsa_lightning.landscape.points import PointRun, generate_points, references, score_points
from salsa_lightning.models.loading import canonical_model_ref, load_tokenizer, resolve_model_path
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.stage import CONFIG_NAME, MANIFEST_NAME, atomic_output_dir, check_output_dir, write_manifest

RESPONSES = "responses"  # one JSON per point, named by its cache key


def validate_judging(cfg: LandscapeConfig, judges: Sequence[str] = ("gold", "reward", "llm")) -> None:
    """The judges (each one of `judges`), what they need (a reward model, the llm_judge block), and the generation
    settings: one sentence for a bad one (the soup report checks its `report:` block with this too)."""
    check_judges(cfg, judges)
    check_generation_settings(cfg)
    if cfg.reward_model:
        try:
            resolve_model_path(cfg.reward_model)
        except SalsaError as err:
            raise SalsaError(f"The reward model {cfg.reward_model}: {err}") from err


def _validate(cfg: LandscapeConfig) -> list[Point]:
    points = landscape_points(len(cfg.seeds), cfg.line, cfg.plane, cfg.extrapolate)
    validate_judging(cfg)
    labels = sorted(p.label for p in points if p.label)  # seed1, seed2[, seed3], soup
    if "llm" in cfg.judges and cfg.llm_reference not in labels:
        raise SalsaError(
            f"llm_reference {cfg.llm_reference} is not a point of this landscape of {len(cfg.seeds)} seeds; use one of "
            f"{', '.join(labels)}."
        )
    out = check_output_dir(cfg.output_dir, cfg.overwrite)
    models = [("seed", p) for p in cfg.seeds] + ([("reward model", cfg.reward_model)] if cfg.reward_model else [])
    for kind, path in models:
        try:
            resolved = resolve_model_path(path)
        except SalsaError as err:
            raise SalsaError(f"The {kind} {path}: {err}") from err
        if Path(resolved).resolve() == out.resolve():
            raise SalsaError(f"The output directory {out} is the {kind} {path}; write the landscape elsewhere.")
    return points


# ---------------------------------------------------------------- the response cache
def cache_key(seed_signatures: list[Any], weights: tuple[float, ...], messages: list, settings: dict) -> str:
    content = {"seeds": seed_signatures, "weights": list(weights), "prompts": messages, **settings}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _cache_sources(cfg: LandscapeConfig) -> list[Path]:
    if not cfg.reuse_responses:
        return []
    out = Path(cfg.output_dir)
    sources = [out / RESPONSES] if cfg.overwrite and out.is_dir() else []
    return sources + ([Path(cfg.cache_dir)] if cfg.cache_dir else [])


def _from_cache(run: PointRun, sources: list[Path], n_prompts: int, refs: list[str]) -> bool:
    for src in sources:
        f = src / f"{run.key}.json"
        if not f.is_file():
            continue
        try:
            rows = json.loads(f.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            continue  # a damaged entry is a miss, not an error: it is regenerated and rewritten
        if len(rows) != n_prompts or any(ref not in r.get("kl", {}) for r in rows for ref in refs):
            continue
        run.texts = [r["response"] for r in rows]
        run.token_ids = [r["response_ids"] for r in rows]
        run.finished = [r["finished"] for r in rows]
        run.kl = {ref: [r["kl"][ref] for r in rows] for ref in refs}
        run.reused = True
        return True
    return False


def _cache_record(run: PointRun, prompts) -> dict[str, Any]:
    rows = []
    for i, row in enumerate(prompts.rows):
        rows.append({
            "index": i, "prompt": row.get("prompt", prompts.messages[i]), "response": run.texts[i],
            "response_ids": run.token_ids[i], "finished": run.finished[i],
            "kl": {ref: v[i] for ref, v in run.kl.items()},
            **({"gold_score": run.gold[i]} if run.gold is not None else {}),
            **({"reward": run.reward[i]} if run.reward is not None else {}),
        })  # fmt: skip
    return {"key": run.key, "weights": list(run.point.weights), "rows": rows}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _judgement_caches(cfg: LandscapeConfig) -> list[Path]:
    """The judgements.jsonl files whose replies the llm judge reuses: the earlier output's when overwriting (as
    `evaluate`), and the shared `cache_dir`'s."""
    out = [Path(cfg.output_dir) / JUDGEMENTS] if cfg.overwrite else []
    return out + ([Path(cfg.cache_dir) / JUDGEMENTS] if cfg.cache_dir else [])


def load_eval_prompts(eval_file: str, limit: int | None, need_gold: bool):
    """The eval prompts of one file (a local file or Hub dataset's `test` split), by evaluate's own loader."""
    split = SimpleNamespace(eval_files={"eval_file": eval_file}, hub_splits={}, prompt_columns={}, limit=limit)
    try:
        return load_split(split, "eval_file", need_gold)
    except SalsaError as err:  # evaluate's loader names its own field, `eval_files.<split>`
        raise SalsaError(str(err).replace("eval_files.eval_file", "eval_file")) from err


def run_landscape(cfg: LandscapeConfig, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the soups of `cfg.seeds` on `cfg.line` / `cfg.plane`; write `cfg.output_dir`; return points.json's dict.

    Raises `SalsaError` (before any model is loaded, leaving nothing behind) for anything the user can fix.
    """
    console = Console(quiet=quiet)
    points = _validate(cfg)
    n = len(cfg.seeds)
    prompts = load_eval_prompts(cfg.eval_file, cfg.limit, "gold" in cfg.judges)
    llm = connect_llm_judge(cfg.llm_judge, _judgement_caches(cfg)) if "llm" in cfg.judges else None
    tokenizer = load_tokenizer(ModelSpec(cfg.seeds[0]), padding_side="left")
    prompt_ids, truncated = encode_prompts(tokenizer, prompts.messages, cfg.max_prompt_length)
    signatures = [model_signature(p) for p in cfg.seeds]
    # what decides the responses, and the cached KLs' batches (rounding-level, but they do change them)
    settings = {**generation_settings(cfg), "device": str(default_device()), "score_batch_size": cfg.score_batch_size}
    runs = [PointRun(p, cache_key(signatures, p.weights, prompts.messages, settings)) for p in points]
    sources = _cache_sources(cfg)
    todo = [r for r in runs if not _from_cache(r, sources, len(prompt_ids), references(r.point, n))]
    if runs and len(todo) < len(runs):
        console.print(f"[dim]reusing {len(runs) - len(todo)} of {len(runs)} points from the cache[/dim]")

    with atomic_output_dir(cfg.output_dir, cfg.overwrite) as tmp:
        if todo:
            generate_points(cfg, todo, prompt_ids, tokenizer, console)
        score_points(cfg, prompts, runs, console)
        # the responses are cached before the llm judge is asked, so a judge that fails costs no generation
        for run in runs:
            text = json.dumps(_cache_record(run, prompts), ensure_ascii=False) + "\n"
            _write_atomic(tmp / RESPONSES / f"{run.key}.json", text)
            if cfg.cache_dir and not (Path(cfg.cache_dir) / f"{run.key}.json").is_file():
                _write_atomic(Path(cfg.cache_dir) / f"{run.key}.json", text)  # content-addressed: safe to share
        llm_about: dict[str, Any] = {}
        if llm:
            judgements = judge_points(llm, prompts.messages, runs, cfg.llm_reference, console)
            (tmp / JUDGEMENTS).write_text("".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgements))
            if cfg.cache_dir:
                share_judgements(Path(cfg.cache_dir) / JUDGEMENTS, judgements)
            llm_about = {"llm_judge": {**llm.report(), "reference": cfg.llm_reference}}

        records = [report.point_record(r, cfg.bootstrap_samples, cfg.seed, cfg.llm_reference) for r in runs]
        soup_rows = report.soup_report(records, n)
        about = {
            "prompts": {"source": prompts.source, "n": len(prompts.rows), "truncated": truncated},
            "judges": list(cfg.judges),
            "bootstrap": {"samples": cfg.bootstrap_samples, "seed": cfg.seed, "confidence": 0.95},
        }
        files = report.write_outputs(tmp, records, soup_rows, n, cfg.line is not None, cfg.plane is not None, about)
        files += [JUDGEMENTS] if llm else []
        results = {
            "points": records,
            "soup_report": soup_rows,
            "prompts": about["prompts"],
            "bootstrap": about["bootstrap"],
            **llm_about,
        }
        (tmp / "points.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        manifest = {
            "stage": "landscape",
            "salsa_lightning_version": __version__,
            "seeds": [canonical_model_ref(p) for p in cfg.seeds],
            "seed_format": _seed_format(cfg.seeds),
            "eval_file": canonical_model_ref(cfg.eval_file),
            "judges": list(cfg.judges),
            "reward_model": canonical_model_ref(cfg.reward_model) if cfg.reward_model else None,
            "extrapolate": cfg.extrapolate,
            "generation": settings,
            "points": len(runs),
            "generated_points": len(todo),
            "reused_points": len(runs) - len(todo),
            "responses": {RESPONSES + "/" + r.key + ".json": list(r.point.weights) for r in runs},
            "files": sorted([*files, "points.json", CONFIG_NAME, MANIFEST_NAME, RESPONSES]),
            **llm_about,
        }
        write_manifest(tmp, manifest)

    console.print(report.soup_table(soup_rows))
    if llm:
        console.print(llm_note(results["llm_judge"]))
    console.print(
        f"Landscape of {len(runs)} points ({len(todo)} generated, {len(runs) - len(todo)} from the cache) written to "
        f"{cfg.output_dir} ({', '.join(f for f in files if f.endswith('.png'))})"
    )
    return results


def _seed_format(seeds: list[str]) -> str:
    from salsa_lightning.soup.inputs import describe_inputs

    return describe_inputs([resolve_model_path(p) for p in seeds])[1]
