"""`backend: vllm` for the stages that answer eval prompts (`evaluate`, `landscape`, the soup's report).

Responses come from a vLLM engine; everything after them (scores, judges, log-probs for the KL columns) is the same
code as with `hf`, on the same token ids. Systems that are LoRA adapters on one base share ONE engine on that base,
each system a `LoRARequest` on its own adapter directory; a full-weight system gets an engine of its own (one at a
time). The landscape keeps one engine for all its points and hands each point's weights over in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from salsa_lightning.evaluation.generation import Generated, eos_ids
from salsa_lightning.evaluation.settings import JudgedGeneration
from salsa_lightning.models.loading import adapter_base, is_adapter_dir, resolve_dtype, resolve_model_path
from salsa_lightning.vllm_engine import VllmEngine


def stop_ids(tokenizer, model_dir: str) -> list[int]:
    """The end-of-turn ids `generate` would stop at: the tokenizer's EOS and the model's generation config's."""
    ids = set(eos_ids(tokenizer))
    f = Path(model_dir) / "generation_config.json"
    if f.is_file():
        extra = json.loads(f.read_text()).get("eos_token_id")
        if extra is not None:
            ids.update([extra] if isinstance(extra, int) else extra)
    return sorted(ids)


def engine_responses(
    engine: VllmEngine,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    cfg: JudgedGeneration,
    stop: Sequence[int],
    on_batch: Callable[[int], None] | None = None,
) -> list[Generated]:
    """`generate_responses`' result from the engine: greedy unless `cfg.do_sample` (then seeded by `cfg.seed`)."""
    samples = engine.generate(prompt_ids, cfg.max_new_tokens, stop, do_sample=cfg.do_sample,
                              temperature=cfg.temperature, seed=cfg.seed)  # fmt: skip
    if on_batch is not None:
        on_batch(len(prompt_ids))
    return [
        Generated(tokenizer.decode(s.token_ids, skip_special_tokens=True), s.token_ids, s.finished) for s in samples
    ]


def _rank(path: str) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])


class SystemEngines:
    """The engines of `evaluate`'s systems: `engine_for(path)` gives the engine that answers as the system at
    `path`, with that system's adapter selected."""

    def __init__(self, cfg: JudgedGeneration, paths: Sequence[str]):
        self.cfg = cfg
        adapters = [resolve_model_path(p) for p in paths if is_adapter_dir(resolve_model_path(p))]
        # one rank slot per base, large enough for every adapter on it
        self.ranks: dict[str, int] = {}
        for a in adapters:
            base = resolve_model_path(adapter_base(a))
            self.ranks[base] = max(self.ranks.get(base, 0), _rank(a))
        self.key: str | None = None
        self.engine: VllmEngine | None = None

    def engine_for(self, path: str) -> tuple[VllmEngine, str]:
        """(engine, the model directory whose generation config applies)."""
        path = resolve_model_path(path)
        model_dir = resolve_model_path(adapter_base(path)) if is_adapter_dir(path) else path
        if self.key != model_dir:
            self.close()  # one engine at a time: each holds a model and its KV cache
            rank = self.ranks.get(model_dir)
            self.engine = VllmEngine(model_dir, resolve_dtype(self.cfg.dtype), self.cfg.vllm, max_lora_rank=rank,
                                     seed=self.cfg.seed, context=_context(model_dir))  # fmt: skip
            self.key = model_dir
        if is_adapter_dir(path):
            self.engine.use_adapter(path)
        else:
            self.engine.lora = None
        return self.engine, model_dir

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.key = None, None


def _context(model_dir: str) -> int | None:
    f = Path(model_dir) / "config.json"
    return json.loads(f.read_text()).get("max_position_embeddings") if f.is_file() else None


def soup_engine(soup, cfg: JudgedGeneration, seeds: Sequence[str]) -> tuple[VllmEngine, str]:
    """One engine for every landscape point: on the seeds' base with a LoRA slot of the soup's rank (LoRA seeds), or
    on seed 1's architecture (full seeds, whose weights each point replaces)."""
    first = resolve_model_path(seeds[0])
    dtype = resolve_dtype(cfg.dtype)
    if soup.format == "lora":
        base = resolve_model_path(adapter_base(first))
        rank = sum(_rank(resolve_model_path(s)) for s in seeds)
        return VllmEngine(base, dtype, cfg.vllm, max_lora_rank=rank, seed=cfg.seed, context=_context(base)), base
    return VllmEngine(first, dtype, cfg.vllm, seed=cfg.seed, context=_context(first)), first


def hand_over_soup(engine: VllmEngine, soup) -> None:
    """The engine answers as the soup's current point: its cat-souped adapter, or its full weights."""
    if soup.format == "lora":
        engine.set_adapter(soup.current.save)
    else:
        engine.load_weights((k, v.detach()) for k, v in soup.model.state_dict().items())


__all__ = ["SystemEngines", "engine_responses", "hand_over_soup", "soup_engine", "stop_ids"]
