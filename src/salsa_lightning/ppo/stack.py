"""Everything PPO runs a forward pass through — policy, anchors, reward model, critic — in two layouts.

- `FullStack`: the policy and the critic train as full-weight models; every anchor and the reward model
  are frozen copies (DESIGN §3, full-weight mode).
- `LoraStack`: ONE frozen base carries named adapters — `policy` (trainable), `init` (the SFT adapter it
  starts from), `soup`, any MKL anchors, `reward` and `value` — plus two small linear heads. Anchor
  log-probs come from switching the active adapter, not from a second model, so peak memory stays near
  one base model plus activations.

Both satisfy the `Stack` protocol, so the PPO module never asks which layout it runs on; `build_stack` is the one
way to make either, sharded or not.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from salsa_lightning.distributed import (
    FSDPSpec,
    full_state_dict,
    gathered,
    is_sharded,
    shard_decoder_layers,
    shard_module,
)
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import (
    adapter_base,
    enable_gradient_checkpointing,
    is_adapter_dir,
    load_causal_lm,
    lora_config_like,
    resolve_model_path,
)
from salsa_lightning.models.quantization import is_quantized
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.ppo.anchors import InMemorySoup
from salsa_lightning.reward.model import load_reward_model, module_output, sequence_scores, token_scores, unwrap
from salsa_lightning.rl.sequences import gather_last, position_ids_from_mask

POLICY = "policy"  # the name `Stack.logits` knows the trained policy by; every other name is an anchor


class Stack(Protocol):
    """Everything PPO runs a forward pass through. `ids`, `mask`, `pos`: (B, L) `[prompt | response]` tokens, their
    attention mask and position ids."""

    layout: str  # "full" or "lora": what the stage output holds

    def generate(self, **generate_kwargs) -> torch.Tensor:
        """The policy's `generate` (sharded: with its layers gathered for the whole call)."""

    def logits(self, name: str, ids, mask, pos, keep: int = 0) -> torch.Tensor:
        """(B, keep, V) logits of the policy (`name="policy"`) or of the anchor `name`, for the last `keep`
        positions (0 = all): PPO needs only the response's, and the prompt's vocabulary projection would be the
        largest tensor of the step."""

    def reward_scores(self, ids, mask) -> torch.Tensor:
        """(B,) reward at each row's last real token."""

    def values(self, ids, mask, pos) -> torch.Tensor:
        """(B, L) critic values at every position."""

    def gather_policy(self) -> dict[str, torch.Tensor] | None:
        """The policy's unsharded weights (a collective under FSDP: every rank calls it), or None unsharded."""

    def save_policy(self, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Write the policy into `directory` as plain transformers/PEFT load it (full weights, or the adapter)."""


def _backbone(model):
    """The transformer trunk (no LM/score head) of a transformers model, through any PEFT wrapper."""
    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix)


def _hidden(model, ids, mask, pos) -> torch.Tensor:
    """The trunk's last hidden state (B, T, H); `logits_to_keep=1` skips the vocabulary projection of all but one
    position."""
    return module_output(model, _backbone(model), ids, mask, pos, logits_to_keep=1)[0]


def _generation_context(model, spec: FSDPSpec | None):
    """Sharded: keep the policy's layers gathered for the whole `generate` (see distributed.gathered)."""
    if spec is not None and spec.gather_for_generation:
        return gathered(model, spec)
    return contextlib.nullcontext()


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
    ):
        """`sharding` = (device mesh, FSDPSpec): full-weight directories (and full-weight soups) are then read
        straight into FSDP2 shards (`soup.sharded.load_sharded`), so no rank holds a whole copy of any of the
        five models; adapters are merged whole first and sharded by `shard`."""
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
        # the critic starts from the reward model, or (programmatic reward) from the policy's own weights
        self.value = self._reward_model(reward or policy_init, spec, pad).requires_grad_(True)
        if spec.gradient_checkpointing and sharding is not None:
            for model in (self.policy, self.value):
                enable_gradient_checkpointing(model)
        if value_head == "reinit" or reward is None:
            nn.init.zeros_(unwrap(self.value).score.weight)

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
        return _merge_if_peft(model)

    def generate(self, **kwargs) -> torch.Tensor:
        with _generation_context(self.policy, self.fsdp):
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
            self.value,
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


def _merge_if_peft(model):
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


class LoraStack(nn.Module):
    layout = "lora"
    fsdp: FSDPSpec | None = None  # set by `shard`

    def __init__(
        self,
        spec: ModelSpec,
        policy_init: str,
        anchors: dict[str, str],
        reward: str | None,
        value_head: str,
        sharding: tuple[Any, FSDPSpec] | None = None,
    ):
        """`sharding` (FSDP2, bf16/fp32 base): the base is built on the meta device and `shard` reads only each
        rank's rows of the base checkpoint and of every adapter, so no rank holds the whole base."""
        super().__init__()
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from salsa_lightning.models.loading import _from_pretrained

        sources = {"policy": policy_init, **anchors, **({"reward": reward} if reward is not None else {})}
        for name, anchor in list(sources.items()):
            if isinstance(anchor, InMemorySoup):
                sources.pop(name)
                sources.update({f"{name}[{i}]": p for i, p in enumerate(anchor.inputs)})
        for name, path in sources.items():
            if not is_adapter_dir(resolve_model_path(path)):
                raise SalsaError(
                    f"The LoRA layout needs every model as an adapter on one base, but {name} ({path}) holds full "
                    "weights; use `layout: full`, or train that stage with LoRA."
                )
        bases = {
            name: str(Path(resolve_model_path(adapter_base(resolve_model_path(p)))).resolve())
            for name, p in sources.items()
        }
        if len(set(bases.values())) > 1:
            raise SalsaError(
                f"The LoRA layout needs one shared base, but the adapters sit on different bases: {bases}; "
                "train every stage from the same base model."
            )
        self.base_path = adapter_base(resolve_model_path(policy_init))
        # the full weights of every adapter, in PEFT's file naming: what `shard` reads rows from (meta base)
        self.adapter_weights: dict[str, dict[str, torch.Tensor]] = {}
        self.on_meta = sharding is not None and not is_quantized(spec)
        if self.on_meta:
            from salsa_lightning.soup.sharded import empty_model

            base = empty_model(AutoModelForCausalLM, resolve_model_path(self.base_path), spec)
        else:
            base = _from_pretrained(AutoModelForCausalLM, self.base_path, spec)
        base.requires_grad_(False)
        self.model = PeftModel.from_pretrained(
            base, resolve_model_path(policy_init), adapter_name="policy", is_trainable=True
        )
        self._record(POLICY, policy_init)
        for name, path in anchors.items():
            if isinstance(path, InMemorySoup):
                self._add_soup_adapter(name, path)
            else:
                self.model.load_adapter(resolve_model_path(path), adapter_name=name, is_trainable=False)
                self._record(name, path)
        hidden = base.config.hidden_size
        self.reward_head = nn.Linear(hidden, 1, bias=False).requires_grad_(False)
        self.value_head = nn.Linear(hidden, 1, bias=False)
        if reward is not None:
            self._add_scoring_adapter("reward", reward, self.reward_head)
            self._add_scoring_adapter("value", reward, self.value_head)
        else:  # programmatic reward: the critic starts from the policy's adapter with a zero head
            self.model.load_adapter(resolve_model_path(policy_init), adapter_name="value", is_trainable=True)
            self._record("value", policy_init)
        if value_head == "reinit" or reward is None:
            nn.init.zeros_(self.value_head.weight)
        self.value_head.requires_grad_(True)
        self._trainable = {"policy", "value"}
        self._set_flags()

    def _add_soup_adapter(self, name: str, soup: InMemorySoup) -> None:
        """The exact (cat) LoRA soup of the seeds' adapters, added beside the policy on the same base."""
        from peft import set_peft_model_state_dict

        from salsa_lightning.soup.api import load_lora_adapter, soup_lora_adapters

        souped = soup_lora_adapters([load_lora_adapter(resolve_model_path(p)) for p in soup.inputs], soup.weights)
        self.model.add_adapter(name, souped.peft_config())
        if self.on_meta:
            self.adapter_weights[name] = souped.state_dict
        result = set_peft_model_state_dict(self.model, souped.state_dict, adapter_name=name)
        if result.unexpected_keys:
            raise SalsaError(
                f"The souped adapter does not fit the policy's base model; check soup_inputs {soup.inputs}."
            )

    def _add_scoring_adapter(self, name: str, path: str, head: nn.Linear) -> None:
        """A sequence-classification adapter (reward stage output) split into a LoRA adapter on the causal-LM
        base and its `score` head: the backbones are the same module, only the top differs."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = resolve_model_path(path)
        self.model.add_adapter(name, lora_config_like(path, task_type="CAUSAL_LM", dropout=0.0))
        weights = load_file(str(Path(path) / "adapter_model.safetensors"))
        score = [k for k in weights if k.endswith("score.weight")]
        if len(score) != 1:
            raise SalsaError(f"{path} holds no reward head (`score.weight`); pass a reward stage output.")
        head.weight.data.copy_(weights.pop(score[0]).to(head.weight.dtype))
        if self.on_meta:
            self.adapter_weights[name] = weights
        result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
        if result.unexpected_keys:
            raise SalsaError(
                f"The reward adapter {path} does not fit the policy's base model; retrain it on that base."
            )

    def _record(self, name: str, path: str) -> None:
        """Keep an adapter's full weights until `shard` has read this rank's rows (a meta base only)."""
        from safetensors.torch import load_file

        if self.on_meta:
            self.adapter_weights[name] = load_file(str(Path(resolve_model_path(path)) / "adapter_model.safetensors"))

    def _set_flags(self) -> None:
        # PEFT's set_adapter makes only the active adapter trainable; PPO trains two at once.
        for n, p in self.model.named_parameters():
            p.requires_grad_(any(f".{a}." in n for a in self._trainable) and "lora_" in n)

    def _use(self, name: str) -> None:
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            self._set_flags()

    def generate(self, **kwargs) -> torch.Tensor:
        self._use(POLICY)
        with _generation_context(unwrap(self.model), self.fsdp):
            return self.model.generate(**kwargs)

    def logits(self, name: str, ids, mask, pos, keep: int = 0) -> torch.Tensor:
        self._use(name)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                          logits_to_keep=keep).logits  # fmt: skip

    def reward_scores(self, ids, mask) -> torch.Tensor:
        self._use("reward")
        hidden = gather_last(_hidden(self.model, ids, mask, position_ids_from_mask(mask)), mask)  # (B, H)
        return self.reward_head(hidden.to(self.reward_head.weight.dtype)).squeeze(-1).float()

    def values(self, ids, mask, pos) -> torch.Tensor:
        self._use("value")
        return self.value_head(_hidden(self.model, ids, mask, pos).to(self.value_head.weight.dtype)).squeeze(-1).float()

    def gather_policy(self) -> dict[str, torch.Tensor] | None:
        self._use(POLICY)
        return full_state_dict(self.model)

    def save_policy(self, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Only the `policy` adapter, as a plain adapter directory: PEFT writes a non-default adapter into a
        sub-folder named after it, so it is written aside and lifted to the top."""
        gathered_weights = {"state_dict": state_dict} if state_dict is not None else {}
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[POLICY], safe_serialization=True, **gathered_weights)
            src = Path(tmp) / POLICY if (Path(tmp) / POLICY).is_dir() else Path(tmp)
            for f in src.iterdir():
                if f.is_file():
                    shutil.move(str(f), Path(directory) / f.name)

    def shard(self, device_mesh, spec: FSDPSpec) -> None:
        """FSDP2: the shared base (with every adapter) sharded per decoder layer; its root is the transformers model
        inside the PEFT wrapper, whose forward both `model(...)` and `model.generate(...)` reach. The heads are
        sharded on their own."""
        from salsa_lightning.soup.sharded import CheckpointRows, is_on_meta, materialize_sharded

        if is_on_meta(self.model):
            with CheckpointRows([self.base_path]) as base_rows:

                def read_rows(name: str, start: int, stop: int) -> torch.Tensor | None:
                    parts = name.split(".")
                    lora = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
                    if lora is None:  # a base weight: its name in the base checkpoint
                        key = ".".join(p for p in parts if p != "base_layer").removeprefix("base_model.model.")
                        return base_rows(key, start, stop)
                    adapter, key = parts[lora + 1], ".".join(parts[: lora + 1] + parts[lora + 2 :])
                    return self.adapter_weights[adapter][key][start:stop]

                materialize_sharded(self.model, lambda m: shard_decoder_layers(unwrap(m), device_mesh, spec),
                                    device_mesh.device_type, read_rows)  # fmt: skip
            self._set_flags()
            rank_zero_info("LoRA layout: the base and every adapter were read straight into FSDP2 shards.")
        else:
            shard_decoder_layers(unwrap(self.model), device_mesh, spec)
        self.adapter_weights = {}
        shard_module(self.reward_head, device_mesh, spec)
        shard_module(self.value_head, device_mesh, spec)
        self.fsdp = spec


def build_stack(
    layout: str,
    spec: ModelSpec,
    policy_init: str,
    anchors: dict[str, str | InMemorySoup],
    reward: str | None,
    value_head: str,
    sharding: tuple[Any, FSDPSpec] | None = None,
) -> Stack:
    """The stack for `layout` (`auto`: lora when every model is an adapter), sharded per decoder layer when
    `sharding` = (device mesh, FSDPSpec) is given, in eval mode (no dropout: rollout and update log-probs must come
    from the same function)."""
    if layout == "auto":
        adapters = [policy_init, *([reward] if reward else [])]
        for anchor in anchors.values():
            adapters += list(anchor.inputs) if isinstance(anchor, InMemorySoup) else [anchor]
        layout = "lora" if all(is_adapter_dir(resolve_model_path(p)) for p in adapters) else "full"
    if layout == "full":
        from salsa_lightning.models.quantization import refuse_full_weights

        refuse_full_weights(spec, "PPO's full layout (separate full-weight models)")
    # PEFT draws random initial LoRA weights before loading saved ones; fork the RNG so that which anchors are
    # loaded never changes the rollouts (PPO and SALSA runs then share sampling noise)
    with torch.random.fork_rng(devices=[]):
        cls = FullStack if layout == "full" else LoraStack
        stack = cls(spec, policy_init, anchors, reward, value_head, sharding)
    if sharding is not None:
        stack.shard(*sharding)
    return stack.eval()


__all__ = ["POLICY", "FullStack", "LoraStack", "Stack", "build_stack"]
