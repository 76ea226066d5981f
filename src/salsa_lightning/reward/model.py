"""Reward models: a sequence-classification head (`score`, one label) on an SFT model's backbone.

The reward is read at the last REAL token, found from the attention mask. (transformers' own
*ForSequenceClassification pooling finds it from `pad_token_id`, which is wrong when pad == EOS and a
sequence ends in EOS — SmolLM2's case — so we read the head at every position and pick that token ourselves.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import (
    ModelSpec,
    _from_pretrained,
    adapter_base,
    enable_gradient_checkpointing,
    is_adapter_dir,
    lora_config,
    lora_config_like,
    resolve_model_path,
)
from salsa_lightning.models.quantization import refuse_full_weights
from salsa_lightning.rl.sequences import gather_last
from salsa_lightning.stage import read_manifest


def _check_model_dir(path: str, name: str) -> dict:
    """The manifest of a local model directory (or {} for a Hub id / plain HF dir)."""
    p = Path(path)
    manifest = (read_manifest(p) or {}) if p.exists() else {}
    if manifest.get("stage") in {"ppo", "salsa"}:
        raise SalsaError(f"{name} is a PPO policy output; start the reward model from an SFT stage output.")
    return manifest


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def module_output(model, module, input_ids, attention_mask, position_ids=None, **forward_kwargs):
    """What `module` (a part of `model`: its trunk, its score head) returns during `model`'s own forward, read by a
    forward hook.

    Runs the whole model's forward (through any PEFT wrapper) rather than calling its parts one by one: under FSDP
    the root module's forward is what gathers the embeddings, final norm and head, and registers their gradient
    reduction."""
    captured: list = []
    handle = module.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              **forward_kwargs)  # fmt: skip
    finally:
        handle.remove()
    return captured[-1]


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None) -> torch.Tensor:
    """The `score` head at every position (B, T), float32."""
    return module_output(model, unwrap(model).score, input_ids, attention_mask, position_ids).squeeze(-1).float()


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None) -> torch.Tensor:
    """Scalar reward per row (B,): the head's output at the last real token (found from the mask)."""
    return gather_last(token_scores(model, input_ids, attention_mask, position_ids), attention_mask)


def load_reward_model(spec: ModelSpec, trainable: bool = True, pad_token_id: int | None = None):
    """A reward model from an SFT output (new head) or a reward output (trained head).

    - full-weight SFT dir: all weights + a new `score` head; with `spec.lora`, a fresh LoRA adapter + head;
    - LoRA SFT adapter dir: with `spec.lora` (LoRA mode) the reward adapter STARTS FROM the SFT adapter's
      weights on the same frozen base — the base stays shareable with PPO (DESIGN §3); without it, the
      SFT adapter is merged into full weights;
    - reward output dir: loaded as saved.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(spec.name_or_path)
    manifest = _check_model_dir(path, spec.name_or_path)
    stage = manifest.get("stage")
    merges = is_adapter_dir(path) and stage != "reward" and spec.lora is None
    trains_full = trainable and spec.lora is None and not (is_adapter_dir(path) and stage == "reward")
    if merges or trains_full:
        refuse_full_weights(spec, f"A reward model from {spec.name_or_path} without `lora`")
    if is_adapter_dir(path):
        base = _from_pretrained(
            AutoModelForSequenceClassification, adapter_base(path), spec, new_head="score", num_labels=1
        )
        _set_pad(base, pad_token_id)
        if stage == "reward":
            model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
        elif spec.lora is None:
            # a causal-LM adapter on a sequence-classification base: load it task-agnostic, then merge
            cfg = LoraConfig.from_pretrained(path)
            cfg.task_type = None
            model = PeftModel.from_pretrained(base, path, config=cfg).merge_and_unload()
        else:
            cfg = lora_config_like(path, task_type="SEQ_CLS", dropout=spec.lora.dropout, modules_to_save=["score"])
            model = get_peft_model(base, cfg)
            weights = load_file(str(Path(path) / "adapter_model.safetensors"))
            # the SFT adapter has no `score` head: keep the fresh one, take every LoRA weight from SFT
            current = get_peft_model_state_dict(model)
            if not set(weights) <= set(current):
                raise SalsaError(f"The SFT adapter {spec.name_or_path} does not fit its base model; re-run SFT.")
            result = set_peft_model_state_dict(model, {**current, **weights})
            if result.unexpected_keys:
                raise SalsaError(f"The SFT adapter {spec.name_or_path} does not fit its base model; re-run SFT.")
    else:
        new_head = "score" if stage != "reward" else None  # a reward output has its trained head
        model = _from_pretrained(AutoModelForSequenceClassification, spec.name_or_path, spec, new_head, num_labels=1)
        _set_pad(model, pad_token_id)
        if spec.lora is not None:
            model = get_peft_model(model, lora_config(spec.lora, task_type="SEQ_CLS", modules_to_save=["score"]))
    if not hasattr(unwrap(model), "score"):
        raise SalsaError(f"{spec.name_or_path}: this architecture has no `score` head for sequence classification.")
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _set_pad(model, pad_token_id: int | None) -> None:
    # transformers refuses batched sequence classification without a pad id in the config
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id


def reward_stats(path: str | Path) -> dict | None:
    """The training-set reward mean/std a reward stage stored (PPO and evaluation can normalise with them)."""
    return (read_manifest(path) or {}).get("reward_stats")


def normalization_stats(path: str | Path) -> dict:
    """`reward_stats`, for a run that normalises with them: checked once here, so that normalising never divides by
    zero; a missing or unusable std is one sentence."""
    import math

    stats = reward_stats(path)
    if not stats:
        raise SalsaError(f"normalize_reward needs reward stats in {path}; re-run the reward stage.")
    if not (math.isfinite(stats.get("std", float("nan"))) and stats["std"] > 0):
        raise SalsaError(
            f"The reward stats in {path} have std {stats.get('std')!r} (must be a finite number > 0); re-run the "
            "reward stage, or turn normalisation off."
        )
    return stats


def reward_max_length(path: str | Path, default: int = 1024) -> int:
    """How many tokens the reward stage saw per sequence (it truncates from the left): scoring elsewhere must cut
    the same way, or the model is read on inputs it never saw. Older outputs lack the field: `default`."""
    return int((read_manifest(path) or {}).get("max_length") or default)


__all__ = [
    "load_reward_model",
    "module_output",
    "reward_max_length",
    "reward_stats",
    "sequence_scores",
    "token_scores",
    "unwrap",
]
