"""Each system's responses on each split: generated turn by turn from a model loaded once, or reused from the previous
run in the output directory when nothing that decides them changed; written as JSONL and as alpaca_eval's input."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from salsa_lightning.data.chat import Messages
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.engines import SystemEngines, engine_responses, stop_ids
from salsa_lightning.evaluation.generation import encode_prompts, generate_responses, response_logprobs
from salsa_lightning.evaluation.llm_judge import question_text
from salsa_lightning.evaluation.prompts import conversations
from salsa_lightning.evaluation.runtime import load_frozen_lm, model_signature, progress_bar, release_memory
from salsa_lightning.evaluation.settings import generation_settings
from salsa_lightning.evaluation.splits import SplitPrompts
from salsa_lightning.stage import read_manifest

ALPACA_EVAL_DIR = "alpaca_eval"


@dataclass
class Responses:
    """One system's responses on one split, with what the metrics need."""

    prompts: list[Messages]  # the conversation each response answers (later turns hold the system's own answers)
    prompt_ids: list[list[int]]
    texts: list[str]
    token_ids: list[list[int]]
    finished: list[bool]
    truncated_prompts: int
    reused: bool = False
    logp: list[torch.Tensor] | None = None  # the system's own log-probs of its tokens (for KL)
    kl: dict[str, list[float]] = field(default_factory=dict)
    reward: list[float] | None = None
    gold: list[float] | None = None


# ---------------------------------------------------------------- reuse of a previous run's responses
def _fingerprint(cfg: EvalConfig, system_path: str, prompts: SplitPrompts) -> str:
    content = {
        "model": model_signature(system_path),
        "prompts": [p.messages for p in prompts.prompts],
        # only where there are later turns, so that a single-turn split keeps its fingerprint
        **({"followups": [p.followups for p in prompts.prompts]} if prompts.multi_turn else {}),
        **generation_settings(cfg),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def response_file(system: str, split: str) -> str:
    """The name of the JSONL file that holds `system`'s responses on `split` in the output directory."""
    return f"responses_{system}_{split}.jsonl"


def _reusable(cfg: EvalConfig, out: Path, system: str, split: str, fingerprint: str) -> list[dict] | None:
    if not (cfg.overwrite and cfg.reuse_responses and out.is_dir()):
        return None
    previous = (read_manifest(out) or {}).get("responses", {}).get(f"{system}/{split}", {})
    f = out / response_file(system, split)
    if previous.get("fingerprint") != fingerprint or not f.is_file():
        return None
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- generation
def _generate_split(cfg: EvalConfig, respond, tokenizer, prompts: SplitPrompts, on_batch) -> Responses:
    """One system's responses to every item of a split, turn by turn: a later turn's prompt holds the system's
    own answers to the turns before it, so turn k is generated only once turn k-1 is (a single-turn split: one
    call on every prompt). `respond(prompt_ids, on_batch)` -> one `Generated` per prompt (the backend's)."""
    n = len(prompts.items)
    convs: list[Messages | None] = [None] * n
    prompt_ids: list[list[int] | None] = [None] * n
    generated: list[Any] = [None] * n
    texts: list[str | None] = [None] * n
    truncated = 0
    for turn in range(max(p.num_turns for p in prompts.prompts)):
        todo = [k for k, (_, t) in enumerate(prompts.items) if t == turn]
        current = conversations(prompts.prompts, texts)
        ids, cut = encode_prompts(tokenizer, [current[k] for k in todo], cfg.max_prompt_length)
        truncated += cut
        out = respond(ids, on_batch)
        for k, k_ids, g in zip(todo, ids, out, strict=True):
            convs[k], prompt_ids[k], generated[k], texts[k] = current[k], k_ids, g, g.text
    return Responses(
        convs,  # type: ignore[arg-type]
        prompt_ids,  # type: ignore[arg-type]
        [g.text for g in generated],
        [g.token_ids for g in generated],
        [g.finished for g in generated],
        truncated,
    )


def generate_all(
    cfg: EvalConfig,
    out: Path,
    splits: dict[str, SplitPrompts],
    tokenizers: dict[tuple[str, str], Any],
    console: Console,
) -> tuple[dict[str, dict[str, Responses]], dict[str, dict[str, str]]]:
    """Every system's responses on every split (system -> split -> `Responses`), each system loaded once and only
    if some split is not reused; with KL references, also each system's own log-probs of them. Plus the
    manifest's `responses` entry: `system/split` -> its file and fingerprint."""
    responses: dict[str, dict[str, Responses]] = {}
    fingerprints: dict[str, dict[str, str]] = {}
    need_logp = bool(cfg.kl_reference)
    engines = SystemEngines(cfg, list(cfg.systems.values())) if cfg.backend == "vllm" else None
    for system, path in cfg.systems.items():
        tokenizer = tokenizers[("System", system)]
        model = None
        responses[system] = {}
        for split, prompts in splits.items():
            fp = _fingerprint(cfg, path, prompts)
            fingerprints[f"{system}/{split}"] = {"file": response_file(system, split), "fingerprint": fp}
            cached = _reusable(cfg, out, system, split, fp)
            if cached is not None and len(cached) == len(prompts.items):
                console.print(f"[dim]{system} / {split}: reusing {len(cached)} responses from {out}[/dim]")
                texts = [r["response"] for r in cached]
                convs = conversations(prompts.prompts, texts)
                prompt_ids, truncated = encode_prompts(tokenizer, convs, cfg.max_prompt_length)
                res = Responses(
                    convs,
                    prompt_ids,
                    texts,
                    [r["response_ids"] for r in cached],
                    [r["finished"] for r in cached],
                    truncated,
                    reused=True,
                )
            else:
                if engines is not None:
                    with console.status(f"vLLM engine for {system} ({path})"):
                        engine, model_dir = engines.engine_for(path)
                    stop = stop_ids(tokenizer, model_dir)

                    def respond(ids, on_batch, engine=engine, stop=stop, tokenizer=tokenizer):
                        return engine_responses(engine, tokenizer, ids, cfg, stop, on_batch)

                else:
                    if model is None:
                        with console.status(f"loading {system} ({path})"):
                            model = load_frozen_lm(path, cfg.dtype)

                    def respond(ids, on_batch, model=model, tokenizer=tokenizer):
                        return generate_responses(model, tokenizer, ids, cfg.max_new_tokens, cfg.batch_size,
                                                  cfg.do_sample, cfg.temperature, on_batch)  # fmt: skip

                with progress_bar(console) as progress:
                    task = progress.add_task(f"{system} / {split}", total=len(prompts.items))
                    # a seed per (system, split), so a run's samples do not depend on which others ran before
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(cfg.seed)
                        res = _generate_split(
                            cfg, respond, tokenizer, prompts, on_batch=lambda k, t=task: progress.advance(t, k)
                        )
            responses[system][split] = res
        if need_logp:
            if model is None:
                model = load_frozen_lm(path, cfg.dtype)
            with console.status(f"{system}: log-probs of its responses"):
                for res in responses[system].values():
                    res.logp = response_logprobs(
                        model, res.prompt_ids, res.token_ids, cfg.score_batch_size, tokenizer.pad_token_id
                    )
        del model
        release_memory()
    if engines is not None:
        engines.close()
    return responses, fingerprints


# ---------------------------------------------------------------- files
def write_responses(path: Path, prompts: SplitPrompts, res: Responses) -> None:
    """One JSON line per item: its prompt (a later turn's: the system's own conversation), response and token ids,
    and whichever of gold score, reward and KL were measured."""
    multi_turn = prompts.multi_turn
    with open(path, "w", encoding="utf-8") as f:
        for i, (r, turn) in enumerate(prompts.items):
            row = prompts.rows[r]
            record = {
                "index": r,
                # a later turn's prompt is the system's own conversation so far
                **(
                    {"turn": turn + 1, "prompt": res.prompts[i]}
                    if multi_turn
                    else {"prompt": row.get("prompt", res.prompts[i])}
                ),
                **({"family": row["family"]} if "family" in row else {}),
                "response": res.texts[i],
                "response_ids": res.token_ids[i],
                "num_tokens": len(res.token_ids[i]),
                "finished": res.finished[i],
                **({"gold_score": res.gold[i]} if res.gold is not None else {}),
                **({"reward": res.reward[i]} if res.reward is not None else {}),
                **({"kl": {ref: v[i] for ref, v in res.kl.items()}} if res.kl else {}),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_alpaca_eval(path: Path, system: str, prompts: SplitPrompts, res: Responses) -> None:
    """The first-turn responses as alpaca_eval reads model outputs: a JSON list of {instruction, output, generator}.

    alpaca_eval pairs two generators' outputs by instruction and has no later turns, so a multi-turn split
    exports its first turn only (a later turn's prompt holds the system's own answers and would match nothing).
    """
    records = [
        {"instruction": question_text(res.prompts[i]), "output": res.texts[i], "generator": system}
        for i, (_, turn) in enumerate(prompts.items)
        if turn == 0
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
