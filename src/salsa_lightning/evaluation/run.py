"""`run_evaluate`: the `evaluate` stage — systems and prompts in, one self-describing output directory out.

Order of work, so that the expensive part runs once and a mistake is found before it:

1. check everything that can be checked without a model (names, pairs, files, paths, the output dir,
   that the gold judge can parse every prompt, that KL references share each system's vocabulary, that
   the llm judge's key is set and its endpoint answers): `checks`, `splits`, `judging.connect_llm_judge`;
2. for each system, load it once and generate its responses on every split — turn by turn where prompts
   have several user turns (MT-Bench), each later turn after the system's own answer — or reuse them from the
   previous run in `output_dir` when nothing that decides them changed; plus its own log-probs of them
   when KL references are given: `responses`;
3. for each KL reference, load it once and score every system's responses: `scoring`;
4. score every response with the reward model (if any) and the gold judge: `scoring`;
5. judge each pair on each split with each judge (the llm judge's requests all at once, cached replies
   reused): `judging`; tables, plot, the alpaca_eval export, manifest; rename into place.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from salsa_lightning import __version__
from salsa_lightning.evaluation import report
from salsa_lightning.evaluation.checks import (
    check_generation_settings,
    check_vocabularies,
    load_tokenizers,
    validate_config,
)
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.judging import JUDGEMENTS, connect_llm_judge, judge_pairs, llm_note
from salsa_lightning.evaluation.responses import (
    ALPACA_EVAL_DIR,
    Responses,
    generate_all,
    response_file,
    write_alpaca_eval,
    write_responses,
)
from salsa_lightning.evaluation.runtime import default_device
from salsa_lightning.evaluation.scoring import measure_kl, score_gold, score_rewards
from salsa_lightning.evaluation.splits import SplitPrompts, load_split
from salsa_lightning.models.loading import canonical_model_ref
from salsa_lightning.stage import (
    CONFIG_NAME,
    MANIFEST_NAME,
    atomic_output_dir,
    sha256_file,
    write_manifest,
)

# the public names, those that moved to checks, responses and splits still importable from here
__all__ = ["ALPACA_EVAL_DIR", "Responses", "SplitPrompts", "check_generation_settings", "run_evaluate"]


def _mean(xs: list[float] | None) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _unusable(pair_records: list[dict[str, Any]]) -> list[str]:
    """The llm judge's comparisons where no prompt got a usable verdict (n = 0), e.g. 'salsa vs ppo on id'."""
    return [f"{r['a']} vs {r['b']} on {r['split']}" for r in pair_records if r["judge"] == "llm" and r["n"] == 0]


def _system_record(system: str, split: str, res: Responses) -> dict[str, Any]:
    return {
        "system": system,
        "split": split,
        "n": len(res.texts),
        "gold_score": _mean(res.gold),
        "reward": _mean(res.reward),
        "length": _mean([float(len(t)) for t in res.token_ids]),
        "finished": _mean([float(f) for f in res.finished]),
        "kl": {ref: _mean(v) for ref, v in res.kl.items()},
        "truncated_prompts": res.truncated_prompts,
        "reused_responses": res.reused,
    }


def run_evaluate(cfg: EvalConfig, quiet: bool = False) -> dict[str, Any]:
    """Evaluate `cfg.systems` on `cfg.eval_files`; write everything to `cfg.output_dir` and return results.json's dict.

    Raises `SalsaError` (before any model is loaded, and leaving nothing behind) for anything the user can fix.
    """
    console = Console(quiet=quiet)
    pairs, plot_pair = validate_config(cfg)
    out = Path(cfg.output_dir)
    splits = {s: load_split(cfg, s, "gold" in cfg.judges) for s in cfg.eval_files}
    tokenizers = load_tokenizers(cfg)
    check_vocabularies(cfg, tokenizers)
    # with `overwrite`, the earlier run's replies in `out` are the llm judge's cache
    llm = connect_llm_judge(cfg.llm_judge, [out / JUDGEMENTS] if cfg.overwrite else []) if "llm" in cfg.judges else None

    with atomic_output_dir(out, cfg.overwrite) as tmp:
        responses, fingerprints = generate_all(cfg, out, splits, tokenizers, console)
        measure_kl(cfg, responses, tokenizers, console)
        if cfg.reward_model:
            score_rewards(cfg, responses, console)
        if "gold" in cfg.judges:
            score_gold(splits, responses)

        pair_records, judgements = judge_pairs(cfg, pairs, splits, responses, llm, console)
        for system, by_split in responses.items():
            for split, res in by_split.items():
                write_responses(tmp / response_file(system, split), splits[split], res)
                write_alpaca_eval(tmp / ALPACA_EVAL_DIR / split / f"{system}.json", system, splits[split], res)
        system_records = [_system_record(s, split, res) for s, by in responses.items() for split, res in by.items()]

        quantity = "reward" if cfg.reward_model else "gold score"
        plot_values = {
            split: {
                s: (responses[s][split].reward if cfg.reward_model else responses[s][split].gold) for s in plot_pair
            }
            for split in splits
        }
        plot_note = None
        if any(v is None for by in plot_values.values() for v in by.values()):
            plot_note = "no reward model and no gold judge: nothing to plot"
        else:
            report.plot_distributions(tmp / "reward_distribution.png", plot_values, quantity)

        results = {
            "pairs": pair_records,
            "systems": system_records,
            "plot": {
                "file": "reward_distribution.png",
                "systems": list(plot_pair),
                "quantity": quantity,
                "note": plot_note,
            },
            "prompts": {
                s: {"source": p.source, "n": len(p.rows), "responses_per_system": len(p.items)}
                for s, p in splits.items()
            },
            "bootstrap": {"samples": cfg.bootstrap_samples, "seed": cfg.seed, "confidence": 0.95},
            **({"llm_judge": {**llm.report(), "no_usable_verdict": _unusable(pair_records)}} if llm else {}),
        }
        notes = {"llm": llm_note(results["llm_judge"])} if llm else {}
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        with open(tmp / JUDGEMENTS, "w") as f:
            f.writelines(json.dumps(j) + "\n" for j in judgements)
        report.write_win_rates_csv(tmp / "win_rates.csv", pair_records)
        (tmp / "win_rates.md").write_text(report.win_rates_markdown(pair_records, notes=notes))
        report.write_systems_csv(tmp / "systems.csv", system_records)
        (tmp / "systems.md").write_text(report.systems_markdown(system_records))
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        manifest = _manifest(cfg, splits, pairs, fingerprints, plotted=plot_note is None)
        write_manifest(tmp, {**manifest, **({"llm_judge": results["llm_judge"]} if llm else {})})

    if pair_records:
        console.print(report.win_rates_table(pair_records))
    console.print(report.systems_table(system_records))
    for note in notes.values():
        console.print(note)
    console.print(
        f"Evaluation written to {out} (win_rates.md, systems.md, reward_distribution.png, results.json, "
        f"{ALPACA_EVAL_DIR}/<split>/<system>.json)"
    )
    return results


def _manifest(
    cfg: EvalConfig,
    splits: dict[str, SplitPrompts],
    pairs: list[tuple[str, str]],
    fingerprints: dict[str, Any],
    plotted: bool,
) -> dict[str, Any]:
    def file_info(source: str) -> dict[str, Any]:
        p = Path(source).expanduser()
        return {"path": str(p.resolve()), "sha256": sha256_file(p)} if p.is_file() else {"path": source}

    return {
        "stage": "evaluate",
        "salsa_lightning_version": __version__,
        "systems": {name: canonical_model_ref(path) for name, path in cfg.systems.items()},
        "pairs": [list(p) for p in pairs],
        "eval_files": {s: {**file_info(p.source), "rows_used": len(p.rows)} for s, p in splits.items()},
        "judges": list(cfg.judges),
        "reward_model": canonical_model_ref(cfg.reward_model) if cfg.reward_model else None,
        "reward_tie_margin": cfg.reward_tie_margin,
        "kl_reference": {k: canonical_model_ref(v) for k, v in (cfg.kl_reference or {}).items()},
        "generation": {
            "max_new_tokens": cfg.max_new_tokens,
            "do_sample": cfg.do_sample,
            "temperature": cfg.temperature if cfg.do_sample else None,
            "batch_size": cfg.batch_size,
            "score_batch_size": cfg.score_batch_size,
        },
        "seed": cfg.seed,
        "device": str(default_device()),
        "responses": fingerprints,
        "files": sorted(
            [
                "results.json",
                JUDGEMENTS,
                ALPACA_EVAL_DIR,
                "win_rates.csv",
                "win_rates.md",
                "systems.csv",
                "systems.md",
                *(["reward_distribution.png"] if plotted else []),
                CONFIG_NAME,
                MANIFEST_NAME,
                *(v["file"] for v in fingerprints.values()),
            ]
        ),
    }
