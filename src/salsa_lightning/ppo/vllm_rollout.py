"""PPO rollouts through vLLM (`model.generation.backend: vllm`): one engine per run, the policy handed over before
every rollout, the responses turned into the same tensors transformers' `generate` gives.

- LoRA layout: the engine loads the shared base ONCE with LoRA enabled; each rollout the current policy adapter
  (a few MB) is written and handed over with a fresh `LoRARequest` — never the whole model.
- Full layout: the engine holds one copy of the policy; each rollout the trainer's current weights are loaded into
  it in place (`load_weights`), by reference (the engine runs in-process).

The trainer still recomputes the log-probs it trains on (a policy forward, as with `hf`); the gap between vLLM's
sampling log-probs and those is logged every rollout as `rollout/logprob_diff` (veRL and OpenRLHF log the same).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import adapter_base, is_adapter_dir, resolve_model_path
from salsa_lightning.ppo.config import GenerationSpec
from salsa_lightning.ppo.stack import Stack
from salsa_lightning.vllm_engine import VllmEngine, pad_logprobs, pad_responses, unpad_prompts

ONE_PROCESS = (
    "`model.generation.backend: vllm` runs on one process only (each rank would need its own engine, fed from the "
    "FSDP shards); set backend: hf for multi-process and FSDP runs."
)


def check_vllm_backend(gen: GenerationSpec, rollout_logprobs: bool, quantized: bool) -> None:
    """`backend: vllm` with settings it cannot serve, refused in one sentence before any model loads."""
    from salsa_lightning.vllm_engine import require_vllm

    f = "model.generation.backend"
    if rollout_logprobs:
        raise SalsaError(
            f"`model.ppo.rollout_logprobs` takes the old log-probs from transformers' generate, but `{f}: vllm` "
            "generates elsewhere (the trainer recomputes them and logs the gap as rollout/logprob_diff); set one of "
            "them back (rollout_logprobs: false, or backend: hf)."
        )
    if gen.merge_lora:
        raise SalsaError(
            f"`model.generation.merge_lora` folds the adapter for transformers' generate; with `{f}: vllm` the "
            "engine applies the adapter itself: set merge_lora to false."
        )
    if quantized:
        raise SalsaError(
            f"`{f}: vllm` does not take a 4-bit (QLoRA) base yet; use backend: hf with a 4-bit base, or load the "
            "base unquantised (model.model.quantization: none)."
        )
    require_vllm(f)


def make_engine(stack: Stack, policy_init: str, gen: GenerationSpec, seed: int) -> VllmEngine:
    """The run's engine, on the base (LoRA layout, with the policy adapter's rank) or on the policy's architecture
    (full layout; its weights are replaced at the first rollout anyway)."""
    policy = resolve_model_path(policy_init)
    config = _config(policy)
    context = config.get("max_position_embeddings")
    if stack.layout == "lora":
        rank = json.loads((Path(policy) / "adapter_config.json").read_text())["r"]
        base = resolve_model_path(stack.base_path)
        return VllmEngine(base, _base_dtype(stack), gen.vllm, max_lora_rank=rank, seed=seed, context=context)
    model_dir = resolve_model_path(adapter_base(policy)) if is_adapter_dir(policy) else policy
    return VllmEngine(model_dir, next(stack.policy.parameters()).dtype, gen.vllm, seed=seed, context=context)


def _config(path: str) -> dict:
    """The model config of `path` (an adapter: its base's)."""
    if is_adapter_dir(path):
        path = resolve_model_path(adapter_base(path))
    return json.loads((Path(path) / "config.json").read_text())


def _base_dtype(stack: Stack) -> torch.dtype:
    """The LoRA layout's base weight dtype (not the adapters', which may be float32 over a bf16 base)."""
    for name, p in stack.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            return p.dtype
    return torch.float32


def hand_over_policy(engine: VllmEngine, stack: Stack) -> None:
    """The engine generates with the trainer's current policy from now on."""
    if stack.layout == "lora":
        engine.set_adapter(lambda directory: stack.save_policy(directory, None))
    else:
        engine.load_weights((name, t.detach()) for name, t in stack.policy.state_dict().items())


def engine_generate(
    engine: VllmEngine, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationSpec, tokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """(response (B, R), the engine's sampling log-probs (B, R)) for left-padded prompts, on their device. The
    samples' seed is drawn from torch's generator, which PPO seeds per rollout: a resumed run samples alike."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    samples = engine.generate(
        unpad_prompts(prompt_ids, prompt_mask),
        max_new_tokens=gen.max_new_tokens,
        stop_token_ids=[tokenizer.eos_token_id],
        do_sample=gen.do_sample,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        min_new_tokens=gen.min_new_tokens,
        seed=seed,
        logprobs=True,
    )
    response = pad_responses(samples, tokenizer.pad_token_id)  # (B, R)
    return response.to(prompt_ids.device), pad_logprobs(samples, response.shape[1]).to(prompt_ids.device)


__all__ = ["ONE_PROCESS", "check_vllm_backend", "engine_generate", "hand_over_policy", "make_engine"]
