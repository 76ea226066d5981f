"""`run_evaluate`: the `evaluate` stage — systems and prompts in, one self-describing output directory out.

Order of work, so that the expensive part runs once and a mistake is found before it:

1. check everything that can be checked without a model (names, pairs, files, paths, the output dir,
   that the gold judge can parse every prompt, that KL references share each system's vocabulary, that
   the llm judge's key is set and its endpoint answers);
2. for each system, load it once and generate its responses on every split — turn by turn where prompts
   have several user turns (MT-Bench), each later turn after the system's own answer — or reuse them from the
   previous run in `output_dir` when nothing that decides them changed; plus its own log-probs of them
   when KL references are given;
3. for each KL reference, load it once and score every system's responses;
4. score every response with the reward model (if any) and the gold judge;
5. judge each pair on each split with each judge (the llm judge's requests all at once, cached replies
   reused); tables, plot, the alpaca_eval export, manifest; rename into place.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from salsa_lightning import __version__
from salsa_lightning.data import judge as gold
from salsa_lightning.data.chat import Messages
from salsa_lightning.data.sources import load_rows
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation import report
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.generation import encode_prompts, generate_responses, response_logprobs
from salsa_lightning.evaluation.kl import sequence_kl
from salsa_lightning.evaluation.llm_judge import (
    LLMJudge,
    PairJudgement,
    comparison,
    question_text,
    read_cache,
    split_verdicts,
)
from salsa_lightning.evaluation.prompts import EvalPrompt, conversations, read_prompt, turn_items
from salsa_lightning.evaluation.stats import verdict_from_scores, win_rate_summary
from salsa_lightning.models.loading import (
    ModelSpec,
    canonical_model_ref,
    check_model_role,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from salsa_lightning.stage import (
    CONFIG_NAME,
    MANIFEST_NAME,
    atomic_output_dir,
    check_output_dir,
    read_manifest,
    sha256_file,
    write_manifest,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # names become file names and CSV cells


@dataclass
class SplitPrompts:
    source: str
    rows: list[dict[str, Any]]
    prompts: list[EvalPrompt]
    items: list[tuple[int, int]]  # (row, turn) of each response, row by row (`evaluation.prompts.turn_items`)
    texts: list[str]  # each item's user turn: what the gold judge reads

    @property
    def multi_turn(self) -> bool:
        return any(p.followups for p in self.prompts)

    @property
    def messages(self) -> list[Messages]:
        """Each row's first-turn prompt: what a single-turn consumer (the landscape) generates from."""
        return [p.messages for p in self.prompts]


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


# ---------------------------------------------------------------- checks (no model loaded)
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


def check_generation_settings(cfg) -> None:
    """The generation and statistics settings evaluate and landscape share: one sentence for a bad one."""
    for key in ("max_new_tokens", "max_prompt_length", "batch_size", "bootstrap_samples"):
        if getattr(cfg, key) < 1:
            raise SalsaError(f"{key} must be >= 1, got {getattr(cfg, key)}; set a positive value.")
    if cfg.limit is not None and cfg.limit < 1:
        raise SalsaError(f"limit must be >= 1 or null, got {cfg.limit}; use null for every prompt.")
    if cfg.do_sample and not cfg.temperature > 0:
        raise SalsaError(f"temperature must be > 0 when sampling, got {cfg.temperature}; use e.g. 1.0.")


def _validate(cfg: EvalConfig) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
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
    unknown = [j for j in cfg.judges if j not in ("gold", "reward", "llm")]
    if unknown or not cfg.judges:
        raise SalsaError(f"Unknown or no judges {unknown or cfg.judges}; set `judges` to a list of gold, reward, llm.")
    if "reward" in cfg.judges and not cfg.reward_model:
        raise SalsaError("The reward judge needs a reward model; set `reward_model` to a reward stage output.")
    if "llm" in cfg.judges and cfg.llm_judge is None:
        raise SalsaError(
            "The llm judge needs `llm_judge`; set at least `llm_judge.model` (and `base_url`, `api_key_env`)."
        )
    if cfg.llm_judge is not None and "llm" not in cfg.judges:
        raise SalsaError("`llm_judge` is set but `llm` is not in `judges`; add llm to `judges` or remove `llm_judge`.")
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


def _load_split(cfg: EvalConfig, split: str, need_gold: bool) -> SplitPrompts:
    source = cfg.eval_files[split]
    try:
        rows = load_rows(source, split=cfg.hub_splits.get(split, "test"))
    except SalsaError as err:
        raise SalsaError(f"eval_files.{split}: {err}") from err
    limit = cfg.limit
    rows = [dict(r) for r in (rows.select(range(min(limit, len(rows)))) if limit else rows)]
    if not rows:
        raise SalsaError(f"The evaluation file {source} ({split}) has no rows; point `eval_files.{split}` at prompts.")
    column = cfg.prompt_columns.get(split)
    try:
        prompts = [read_prompt(r, i, column) for i, r in enumerate(rows)]
    except SalsaError as err:
        raise SalsaError(f"eval_files.{split} ({source}): {err}") from err
    items = turn_items(prompts)
    texts = [
        prompts[row].followups[turn - 1]
        if turn
        else next((m["content"] for m in reversed(prompts[row].messages) if m.get("role") == "user"), "")
        for row, turn in items
    ]
    if need_gold:
        for i, text in enumerate(texts):
            try:
                gold.parse_prompt(text)
            except SalsaError as err:
                raise SalsaError(f"{source} row {i}: {err}") from err
    return SplitPrompts(source, rows, prompts, items, texts)


def _load_tokenizers(cfg: EvalConfig) -> dict[str, Any]:
    """Every system's and reference's tokenizer, loaded up front: a bad model id fails here, before any work."""
    out = {}
    for kind, models in (("System", cfg.systems), ("KL reference", cfg.kl_reference or {})):
        for name, path in models.items():
            try:
                out[(kind, name)] = load_tokenizer(ModelSpec(path), padding_side="left")
            except SalsaError as err:
                raise SalsaError(f"{kind} {name!r}: {err}") from err
    return out


def _check_vocabularies(cfg: EvalConfig, tokenizers: dict[str, Any]) -> None:
    """KL compares log-probs of the same token ids, so a reference must share each system's vocabulary."""
    for ref in cfg.kl_reference or {}:
        ref_vocab = tokenizers[("KL reference", ref)].get_vocab()
        for system in cfg.systems:
            if tokenizers[("System", system)].get_vocab() != ref_vocab:
                raise SalsaError(
                    f"The KL reference {ref!r} and the system {system!r} have different vocabularies, so their "
                    "log-probs of the same tokens cannot be compared; use a reference of the same model family."
                )


# ---------------------------------------------------------------- caching of responses
def _model_signature(path: str) -> dict[str, Any]:
    """What identifies a model's weights cheaply: its files' names, sizes and modification times."""
    resolved = Path(resolve_model_path(path))
    if not resolved.is_dir():
        return {"ref": canonical_model_ref(path)}
    files = sorted(p for p in resolved.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"ref": str(resolved), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _fingerprint(cfg: EvalConfig, system_path: str, prompts: SplitPrompts) -> str:
    content = {
        "model": _model_signature(system_path),
        "prompts": [p.messages for p in prompts.prompts],
        # only where there are later turns, so that a single-turn split keeps its fingerprint
        **({"followups": [p.followups for p in prompts.prompts]} if prompts.multi_turn else {}),
        "dtype": cfg.dtype,
        "max_new_tokens": cfg.max_new_tokens,
        "max_prompt_length": cfg.max_prompt_length,
        "do_sample": cfg.do_sample,
        "temperature": cfg.temperature if cfg.do_sample else None,
        "seed": cfg.seed if cfg.do_sample else None,
        # batching changes greedy results only at the rounding level, but it does change them
        "batch_size": cfg.batch_size,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


ALPACA_EVAL_DIR = "alpaca_eval"


def _response_file(system: str, split: str) -> str:
    return f"responses_{system}_{split}.jsonl"


def _reusable(cfg: EvalConfig, out: Path, system: str, split: str, fingerprint: str) -> list[dict] | None:
    if not (cfg.overwrite and cfg.reuse_responses and out.is_dir()):
        return None
    previous = (read_manifest(out) or {}).get("responses", {}).get(f"{system}/{split}", {})
    f = out / _response_file(system, split)
    if previous.get("fingerprint") != fingerprint or not f.is_file():
        return None
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _write_responses(path: Path, prompts: SplitPrompts, res: Responses) -> None:
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


def _write_alpaca_eval(path: Path, system: str, prompts: SplitPrompts, res: Responses) -> None:
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


# ---------------------------------------------------------------- model work
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _release_memory() -> None:
    """Return a dropped model's memory now: the next model is loaded right after."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _load_lm(path: str, cfg: EvalConfig):
    return load_causal_lm(ModelSpec(name_or_path=path, dtype=cfg.dtype), trainable=False).to(_device())


def _generate_split(cfg: EvalConfig, model, tokenizer, prompts: SplitPrompts, on_batch) -> Responses:
    """One system's responses to every item of a split, turn by turn: a later turn's prompt holds the system's
    own answers to the turns before it, so turn k is generated only once turn k-1 is (a single-turn split: one
    call on every prompt)."""
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
        out = generate_responses(
            model, tokenizer, ids, cfg.max_new_tokens, cfg.batch_size, cfg.do_sample, cfg.temperature, on_batch
        )
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


def _generate_all(
    cfg: EvalConfig, out: Path, splits: dict[str, SplitPrompts], tokenizers: dict[str, Any], console: Console
) -> tuple[dict[str, dict[str, Responses]], dict[str, dict[str, str]]]:
    responses: dict[str, dict[str, Responses]] = {}
    fingerprints: dict[str, dict[str, str]] = {}
    need_logp = bool(cfg.kl_reference)
    for system, path in cfg.systems.items():
        tokenizer = tokenizers[("System", system)]
        model = None
        responses[system] = {}
        for split, prompts in splits.items():
            fp = _fingerprint(cfg, path, prompts)
            fingerprints[f"{system}/{split}"] = {"file": _response_file(system, split), "fingerprint": fp}
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
                if model is None:
                    with console.status(f"loading {system} ({path})"):
                        model = _load_lm(path, cfg)
                with _progress(console) as progress:
                    task = progress.add_task(f"{system} / {split}", total=len(prompts.items))
                    # a seed per (system, split), so a run's samples do not depend on which others ran before
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(cfg.seed)
                        res = _generate_split(
                            cfg, model, tokenizer, prompts, on_batch=lambda k, t=task: progress.advance(t, k)
                        )
            responses[system][split] = res
        if need_logp:
            if model is None:
                model = _load_lm(path, cfg)
            with console.status(f"{system}: log-probs of its responses"):
                for res in responses[system].values():
                    res.logp = response_logprobs(
                        model, res.prompt_ids, res.token_ids, cfg.batch_size, tokenizer.pad_token_id
                    )
        del model
        _release_memory()
    return responses, fingerprints


def _measure_kl(
    cfg: EvalConfig, responses: dict[str, dict[str, Responses]], tokenizers: dict[str, Any], console: Console
) -> None:
    for ref, path in (cfg.kl_reference or {}).items():
        with console.status(f"KL to {ref}: loading {path}"):
            model = _load_lm(path, cfg)
        with console.status(f"KL to {ref}"):
            for system, by_split in responses.items():
                # the system's pad id, as in its own pass: the two passes then see identical batches
                pad_id = tokenizers[("System", system)].pad_token_id
                for res in by_split.values():
                    ref_logp = response_logprobs(model, res.prompt_ids, res.token_ids, cfg.batch_size, pad_id)
                    res.kl[ref] = sequence_kl(res.logp, ref_logp).tolist()
        del model
        _release_memory()


def _score_rewards(cfg: EvalConfig, responses: dict[str, dict[str, Responses]], console: Console) -> None:
    from salsa_lightning.reward.scoring import RewardScorer

    with console.status(f"scoring with the reward model {cfg.reward_model}"):
        scorer = RewardScorer.from_output(
            cfg.reward_model, dtype=cfg.dtype, device=_device(), batch_size=cfg.batch_size
        )
        for by_split in responses.values():
            for res in by_split.values():
                res.reward = scorer.score(res.prompts, res.texts).tolist()
    del scorer
    _release_memory()


# ---------------------------------------------------------------- judging and summaries
def _connect_llm_judge(cfg: EvalConfig, out: Path) -> LLMJudge:
    # the replies of an earlier run into this output are reused: each is keyed by everything that decides it
    cache = read_cache(out / "judgements.jsonl") if cfg.overwrite and out.is_dir() else None
    judge = LLMJudge(cfg.llm_judge, cache)
    judge.connect()  # the pre-flight: key set, endpoint reachable, model served — before any model is loaded
    return judge


def _judge_with_llm(
    judge: LLMJudge,
    pairs: list[tuple[str, str]],
    splits: dict[str, SplitPrompts],
    responses: dict[str, dict[str, Responses]],
    console: Console,
) -> dict[tuple[str, str, str], list[PairJudgement]]:
    """Every pair on every split in one batch, so the thread pool stays full across pairs."""
    spans, comparisons = [], []
    for a, b in pairs:
        for split in splits:
            ra, rb = responses[a][split], responses[b][split]
            spans.append(((a, b, split), len(comparisons), len(comparisons) + len(ra.texts)))
            # a later turn: each system's own conversation, so the judge sees what each answer follows
            comparisons += map(comparison, ra.prompts, ra.texts, rb.prompts, rb.texts)
    with _progress(console) as progress:
        task = progress.add_task(f"llm judge ({judge.spec.model})", total=None)
        judged = judge.judge(
            comparisons, on_reply=lambda done, total: progress.update(task, completed=done, total=total)
        )
    out = {key: judged[lo:hi] for key, lo, hi in spans}
    for (a, b, split), js in out.items():
        if not split_verdicts(js)[0]:
            example = js[0].replies[0].error or js[0].replies[0].text or js[0].replies[1].error or ""
            raise SalsaError(
                f"The llm judge gave no usable verdict for {a} vs {b} on {split} (every prompt unparseable or failed; "
                f"e.g. {example[:200]!r}); check llm_judge.model, the template and the endpoint."
            )
    return out


def _llm_note(report: dict[str, Any]) -> str:
    return (
        f"LLM judge {report['model']}: {report['requests']} requests ({report['retries']} retries), "
        f"{report['cached_replies']} cached replies, {report['prompt_tokens']} prompt + "
        f"{report['completion_tokens']} completion tokens; {report['unparseable_replies']} unparseable replies, "
        f"{report['failed_replies']} failed requests (their prompts are left out of n)."
    )


def _verdicts(judge: str, cfg: EvalConfig, prompts: SplitPrompts, a: Responses, b: Responses) -> list[str]:
    if judge == "gold":
        return [gold.compare(p, x, y) for p, x, y in zip(prompts.texts, a.texts, b.texts, strict=True)]
    return [verdict_from_scores(x, y, cfg.reward_tie_margin) for x, y in zip(a.reward, b.reward, strict=True)]


def _mean(xs: list[float] | None) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


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
    pairs, plot_pair = _validate(cfg)
    out = Path(cfg.output_dir)
    splits = {s: _load_split(cfg, s, "gold" in cfg.judges) for s in cfg.eval_files}
    tokenizers = _load_tokenizers(cfg)
    _check_vocabularies(cfg, tokenizers)
    llm = _connect_llm_judge(cfg, out) if "llm" in cfg.judges else None

    with atomic_output_dir(out, cfg.overwrite) as tmp:
        responses, fingerprints = _generate_all(cfg, out, splits, tokenizers, console)
        _measure_kl(cfg, responses, tokenizers, console)
        if cfg.reward_model:
            _score_rewards(cfg, responses, console)
        if "gold" in cfg.judges:
            for by_split in responses.values():
                for split, res in by_split.items():
                    res.gold = [gold.score(p, r) for p, r in zip(splits[split].texts, res.texts, strict=True)]

        llm_judged = _judge_with_llm(llm, pairs, splits, responses, console) if llm else {}
        pair_records, judgements = [], []
        for judge in cfg.judges:
            for a, b in pairs:
                for split, prompts in splits.items():
                    where = {"judge": judge, "split": split, "a": a, "b": b}
                    if judge == "llm":
                        js = llm_judged[(a, b, split)]
                        verdicts, unparseable, failed = split_verdicts(js)
                        left_out = {"unparseable": unparseable, "failed": failed}
                        judgements += [
                            {**where, "index": i, "verdict": j.verdict, "orders": j.orders()} for i, j in enumerate(js)
                        ]
                    else:
                        verdicts = _verdicts(judge, cfg, prompts, responses[a][split], responses[b][split])
                        left_out = {}
                        judgements += [{**where, "index": i, "verdict": v} for i, v in enumerate(verdicts)]
                    summary = win_rate_summary(verdicts, cfg.bootstrap_samples, cfg.seed)
                    pair_records.append({**where, **summary, **left_out})
        for system, by_split in responses.items():
            for split, res in by_split.items():
                _write_responses(tmp / _response_file(system, split), splits[split], res)
                _write_alpaca_eval(tmp / ALPACA_EVAL_DIR / split / f"{system}.json", system, splits[split], res)
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
            **({"llm_judge": llm.report()} if llm else {}),
        }
        notes = {"llm": _llm_note(results["llm_judge"])} if llm else {}
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        with open(tmp / "judgements.jsonl", "w") as f:
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
        },
        "seed": cfg.seed,
        "device": str(_device()),
        "responses": fingerprints,
        "files": sorted(
            [
                "results.json",
                "judgements.jsonl",
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
