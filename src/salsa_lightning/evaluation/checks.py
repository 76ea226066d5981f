"""What `evaluate` checks before any model is loaded: names, pairs, judges, settings, paths, the output directory,
every tokenizer, and that KL references share each system's vocabulary — one sentence for the first bad one."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.models.loading import ModelSpec, check_model_role, load_tokenizer, resolve_model_path
from salsa_lightning.stage import check_output_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # names become file names and CSV cells


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise SalsaError(
            f"The {kind} name {name!r} cannot be used in file names; use letters, digits, '_', '-', '.' or '+'."
        )


def _resolve_pairs(cfg: EvalConfig) -> list[tuple[str, str]]:
    names = list(cfg.systems)
    if cfg.pairs is None:
        return list(itertools.combinations(names, 2))
    pairs = []
    for pair in cfg.pairs:
        if len(pair) != 2:
            raise SalsaError(f"Each entry of `pairs` must name two systems, got {pair}; write it as [a, b].")
        for name in pair:
            if name not in cfg.systems:
                raise SalsaError(
                    f"The pair {pair} names {name!r}, which is not in `systems` ({', '.join(names)}); "
                    "add it to `systems` or fix the pair."
                )
        if pair[0] == pair[1]:
            raise SalsaError(f"The pair {pair} compares a system with itself; name two different systems.")
        pairs.append((pair[0], pair[1]))
    return pairs


def _check_model(kind: str, name: str, path: str, role: str = "policy") -> None:
    try:
        resolve_model_path(path)
    except SalsaError as err:
        raise SalsaError(f"{kind} {name!r}: {err}") from err
    check_model_role(path, role, name if role == "reward" else f"{kind.lower()} {name}")


def check_judges(cfg, known: Sequence[str] = ("gold", "reward", "llm")) -> None:
    """`cfg.judges` (each one of `known`) and what each needs: a reward model for `reward`, an `llm_judge` block for
    `llm` (and no block without it) — one sentence for the first problem (evaluate, landscape, the soup report)."""
    unknown = [j for j in cfg.judges if j not in known]
    if unknown or not cfg.judges:
        raise SalsaError(f"Unknown or no judges {unknown or cfg.judges}; set `judges` to a list of {', '.join(known)}.")
    if "reward" in cfg.judges and not cfg.reward_model:
        raise SalsaError("The reward judge needs a reward model; set `reward_model` to a reward stage output.")
    llm_judge = getattr(cfg, "llm_judge", None)
    if "llm" in cfg.judges and llm_judge is None:
        raise SalsaError(
            "The llm judge needs `llm_judge`; set at least `llm_judge.model` (and `base_url`, `api_key_env`)."
        )
    if llm_judge is not None and "llm" not in cfg.judges:
        raise SalsaError("`llm_judge` is set but `llm` is not in `judges`; add llm to `judges` or remove `llm_judge`.")


def check_generation_settings(cfg) -> None:
    """The generation and statistics settings evaluate and landscape share: one sentence for a bad one."""
    for key in ("max_new_tokens", "max_prompt_length", "batch_size", "score_batch_size", "bootstrap_samples"):
        if getattr(cfg, key) < 1:
            raise SalsaError(f"{key} must be >= 1, got {getattr(cfg, key)}; set a positive value.")
    if cfg.limit is not None and cfg.limit < 1:
        raise SalsaError(f"limit must be >= 1 or null, got {cfg.limit}; use null for every prompt.")
    if cfg.do_sample and not cfg.temperature > 0:
        raise SalsaError(f"temperature must be > 0 when sampling, got {cfg.temperature}; use e.g. 1.0.")
    if cfg.backend == "vllm":
        from salsa_lightning.vllm_engine import require_vllm

        require_vllm("backend")


def validate_config(cfg: EvalConfig) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """The pairs to judge and the one or two systems to plot, once every field that needs no model is checked
    (the output directory included)."""
    if not cfg.systems:
        raise SalsaError("No systems to evaluate; set `systems`, e.g. {sft: outputs/sft-seed1, salsa: outputs/salsa}.")
    if not cfg.eval_files:
        raise SalsaError("No evaluation prompts; set `eval_files`, e.g. {id: outputs/data/eval_id.jsonl}.")
    for name in cfg.systems:
        _check_name("system", name)
    for split in cfg.eval_files:
        _check_name("split", split)
    for key in ("hub_splits", "prompt_columns"):
        unknown = [s for s in getattr(cfg, key) if s not in cfg.eval_files]
        if unknown:
            raise SalsaError(
                f"`{key}` names the split {unknown[0]!r}, which is not in `eval_files` ({', '.join(cfg.eval_files)}); "
                "use the split names of `eval_files`."
            )
    for ref in cfg.kl_reference or {}:
        _check_name("KL reference", ref)
    pairs = _resolve_pairs(cfg)
    check_judges(cfg)
    if not cfg.reward_tie_margin >= 0:
        raise SalsaError(f"reward_tie_margin must be >= 0, got {cfg.reward_tie_margin}; use e.g. 0.1.")
    check_generation_settings(cfg)
    plot_pair = tuple(cfg.plot_pair) if cfg.plot_pair else (pairs[0] if pairs else tuple(cfg.systems)[:2])
    if not 1 <= len(plot_pair) <= 2 or any(n not in cfg.systems for n in plot_pair):
        raise SalsaError(f"plot_pair {cfg.plot_pair} must name one or two of the systems ({', '.join(cfg.systems)}).")
    out = check_output_dir(cfg.output_dir, cfg.overwrite)
    for name, path in cfg.systems.items():
        _check_model("System", name, path)
        if Path(path).expanduser().resolve() == out.resolve():
            raise SalsaError(f"The output directory {out} is the system {name!r}; write the evaluation elsewhere.")
    for name, path in (cfg.kl_reference or {}).items():
        _check_model("KL reference", name, path)
    if cfg.reward_model:
        _check_model("The reward model", "reward_model", cfg.reward_model, role="reward")
    return pairs, plot_pair


def load_tokenizers(cfg: EvalConfig) -> dict[tuple[str, str], Any]:
    """Every system's and reference's tokenizer by (kind, name), kind "System" or "KL reference"; loaded up front:
    a bad model id fails here, before any work."""
    out = {}
    for kind, models in (("System", cfg.systems), ("KL reference", cfg.kl_reference or {})):
        for name, path in models.items():
            try:
                out[(kind, name)] = load_tokenizer(ModelSpec(path), padding_side="left")
            except SalsaError as err:
                raise SalsaError(f"{kind} {name!r}: {err}") from err
    return out


def check_vocabularies(cfg: EvalConfig, tokenizers: dict[tuple[str, str], Any]) -> None:
    """KL compares log-probs of the same token ids, so a reference must share each system's vocabulary."""
    for ref in cfg.kl_reference or {}:
        ref_vocab = tokenizers[("KL reference", ref)].get_vocab()
        for system in cfg.systems:
            if tokenizers[("System", system)].get_vocab() != ref_vocab:
                raise SalsaError(
                    f"The KL reference {ref!r} and the system {system!r} have different vocabularies, so their "
                    "log-probs of the same tokens cannot be compared; use a reference of the same model family."
                )
