"""`FullStack`: the policy and the critic train as full-weight models; every anchor and the reward model are frozen
copies (DESIGN §3, full-weight mode)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salsa_lightning.distributed import (
    FSDPSpec,
    full_state_dict,
    is_sharded,
    shard_decoder_layers,
)
from salsa_lightning.models.loading import (
    enable_gradient_checkpointing,
    is_adapter_dir,
    load_causal_lm,
    merge_if_peft,
    resolve_model_path,
)
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.ppo.anchors import InMemorySoup
from salsa_lightning.ppo.stack import POLICY, _generation_context, checkpoint_in_eval_mode
from salsa_lightning.reward.model import load_reward_model, sequence_scores, token_scores, unwrap
from salsa_lightning.rl.sequences import position_ids_from_mask


def _merged_causal_lm(path: str, spec: ModelSpec, trainable: bool):
    """A full-weight causal LM from a full directory or an adapter (merged into its base)."""
    model = load_causal_lm(replace(spec, name_or_path=path, lora=None), trainable=trainable)
    if is_adapter_dir(resolve_model_path(path)):
        model = model.merge_and_unload()
        model.requires_grad_(trainable)
    return model


class FullStack(nn.Module):
    layout = "full"
    fsdp: FSDPSpec | None = None  # set by `shard`

    def __init__(
        self,
        spec: ModelSpec,
        policy_init: str,
        anchors: dict[str, str],
        reward: str | None,
        value_head: str,
        sharding: tuple[Any, FSDPSpec] | None = None,
        critic: bool = True,
    ):
        """`sharding` = (device mesh, FSDPSpec): full-weight directories (and full-weight soups) are then read
        straight into FSDP2 shards (`soup.sharded.load_sharded`), so no rank holds a whole copy of any of the
        five models; adapters are merged whole first and sharded by `shard`. `critic=False` (critic-free
        estimators): no value model is built at all."""
        super().__init__()
        self.sharding = sharding
        self.policy = self._causal_lm([policy_init], None, spec).requires_grad_(True)
        self.anchors = nn.ModuleDict()
        for name, path in anchors.items():
            if isinstance(path, InMemorySoup):
                model = self._causal_lm(list(path.inputs), path.weights, spec)
            elif path == policy_init and sharding is None:
                model = copy.deepcopy(self.policy)
            else:
                model = self._causal_lm([path], None, spec)
            self.anchors[name] = model.requires_grad_(False)
        pad = self.policy.config.pad_token_id
        if reward is not None:
            self.reward = self._reward_model(reward, spec, pad).requires_grad_(False)
        if critic:  # it starts from the reward model, or (programmatic reward) from the policy's own weights
            self.value = self._reward_model(reward or policy_init, spec, pad).requires_grad_(True)
            if value_head == "reinit" or reward is None:
                nn.init.zeros_(unwrap(self.value).score.weight)
        if spec.gradient_checkpointing:  # (the unsharded policy has it from `load_causal_lm` already; idempotent)
            for model in (self.policy, *([self.value] if critic else [])):
                enable_gradient_checkpointing(model)

    def train(self, mode: bool = True):
        super().train(mode)
        for model in (self.policy, *([self.value] if hasattr(self, "value") else [])):
            checkpoint_in_eval_mode(model)  # a no-op unless `gradient_checkpointing` is on
        return self

    def _shards_directly(self, paths: list[str]) -> bool:
        return self.sharding is not None and not any(is_adapter_dir(resolve_model_path(p)) for p in paths)

    def _causal_lm(self, paths: list[str], weights, spec: ModelSpec):
        """One input: that model; several: their soup (`weights`, uniform by default)."""
        from salsa_lightning.soup.api import resolve_weights, soup_state_dicts

        weights = list(weights or resolve_weights(len(paths), None))
        if self._shards_directly(paths):
            from transformers import AutoModelForCausalLM

            from salsa_lightning.soup.sharded import load_sharded

            return load_sharded(AutoModelForCausalLM, paths, weights, spec, *self.sharding)
        models = [_merged_causal_lm(p, spec, trainable=False) for p in paths]
        if len(models) > 1:
            models[0].load_state_dict(soup_state_dicts([m.state_dict() for m in models], weights))
        return models[0]

    def _reward_model(self, path: str, spec: ModelSpec, pad: int | None):
        if self._shards_directly([path]):
            from transformers import AutoModelForSequenceClassification

            from salsa_lightning.reward.model import _set_pad
            from salsa_lightning.soup.sharded import load_sharded

            model = load_sharded(AutoModelForSequenceClassification, [path], [1.0], spec, *self.sharding,
                                 missing_ok=lambda name: name.endswith("score.weight"), num_labels=1)  # fmt: skip
            _set_pad(model, pad)
            return model
        model = load_reward_model(replace(spec, name_or_path=path, lora=None), trainable=False, pad_token_id=pad)
        return merge_if_peft(model)

    def generate(self, **kwargs) -> torch.Tensor:
        with torch.no_grad(), _generation_context(self.policy, self.fsdp):  # no_grad first: the cast needs it
            return self.policy.generate(**kwargs)

    def logits(self, name: str, ids, mask, pos, keep: int = 0) -> torch.Tensor:
        model = self.policy if name == POLICY else self.anchors[name]
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=keep).logits

    def reward_scores(self, ids, mask) -> torch.Tensor:
        return sequence_scores(self.reward, ids, mask, position_ids_from_mask(mask))

    def values(self, ids, mask, pos) -> torch.Tensor:
        return token_scores(self.value, ids, mask, pos)  # (B, L)

    def shard(self, device_mesh, spec: FSDPSpec) -> None:
        """FSDP2: every model of the stack sharded per decoder layer (frozen ones too), each its own root."""
        for model in (
            self.policy,
            *self.anchors.values(),
            *([self.reward] if hasattr(self, "reward") else []),
            *([self.value] if hasattr(self, "value") else []),
        ):
            if not is_sharded(model):  # those read straight into shards already are
                shard_decoder_layers(model, device_mesh, spec)
        self.fsdp = spec

    def gather_policy(self) -> dict[str, torch.Tensor] | None:
        return full_state_dict(self.policy)

    def save_policy(self, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        self.policy.save_pretrained(
            directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
        )
