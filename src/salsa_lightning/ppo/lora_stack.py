"""`LoraStack`: ONE frozen base carries named adapters — `policy` (trainable), `init` (the SFT adapter it starts from),
`soup`, any MKL anchors, `reward` and `value` — plus two small linear heads. Anchor log-probs come from switching the
active adapter, not from a second model, so peak memory stays near one base model plus activations (DESIGN §3)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from salsa_lightning.distributed import (
    FSDPSpec,
    full_state_dict,
    shard_decoder_layers,
    shard_module,
)
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import (
    adapter_base,
    enable_gradient_checkpointing,
    is_adapter_dir,
    lora_config_like,
    resolve_model_path,
)
from salsa_lightning.models.precision import hold_frozen_linears_in
from salsa_lightning.models.quantization import is_quantized
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.ppo.anchors import InMemorySoup
from salsa_lightning.ppo.merge import MergedAdapter, MergeRestore, checkpoint_key
from salsa_lightning.ppo.stack import POLICY, _generation_context, _hidden, checkpoint_in_eval_mode
from salsa_lightning.reward.model import unwrap
from salsa_lightning.rl.sequences import gather_last, position_ids_from_mask


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
        critic: bool = True,
        merge_lora: bool = False,
        base_linears_bf16: bool = False,
        merge_restore: MergeRestore = "copy",
    ):
        """`sharding` (FSDP2, bf16/fp32 base): the base is built on the meta device and `shard` reads only each
        rank's rows of the base checkpoint and of every adapter, so no rank holds the whole base. `merge_lora`:
        `generate` runs with the policy adapter merged into the base (`merged_policy`; `build_stack` refuses it
        where it cannot work), the base put back as `merge_restore` says (`ppo.merge`). `base_linears_bf16`: the
        frozen base's Linear weights held in bf16 (`PPOSpec.base_linears_bf16`; checked by `check_base_linears_bf16`)."""
        super().__init__()
        self.merge_lora, self.base_linears_bf16 = merge_lora, base_linears_bf16
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
        if base_linears_bf16:  # before any adapter wraps a Linear: only the base's own weights are cast
            hold_frozen_linears_in(base, torch.bfloat16)
        self.model = PeftModel.from_pretrained(
            base, resolve_model_path(policy_init), adapter_name="policy", is_trainable=True
        )
        self._record(POLICY, policy_init)
        if spec.gradient_checkpointing and not is_quantized(spec):  # a 4-bit base got it from `prepare_quantized`
            enable_gradient_checkpointing(self.model)
        for name, path in anchors.items():
            if isinstance(path, InMemorySoup):
                self._add_soup_adapter(name, path)
            else:
                self.model.load_adapter(resolve_model_path(path), adapter_name=name, is_trainable=False)
                self._record(name, path)
        hidden = base.config.hidden_size
        self.reward_head = nn.Linear(hidden, 1, bias=False).requires_grad_(False)
        if reward is not None:
            self._add_scoring_adapter("reward", reward, self.reward_head)
        self._trainable = {POLICY}
        if critic:  # critic-free estimators build no value adapter or head at all
            self.value_head = nn.Linear(hidden, 1, bias=False)
            if reward is not None:
                self._add_scoring_adapter("value", reward, self.value_head)
            else:  # programmatic reward: the critic starts from the policy's adapter with a zero head
                self.model.load_adapter(resolve_model_path(policy_init), adapter_name="value", is_trainable=True)
                self._record("value", policy_init)
            if value_head == "reinit" or reward is None:
                nn.init.zeros_(self.value_head.weight)
            self.value_head.requires_grad_(True)
            self._trainable.add("value")
        self._set_flags()
        self._merged = None
        if merge_lora:
            self._merged = MergedAdapter(self.model, POLICY, merge_restore, self.base_path, spec.revision)

    def train(self, mode: bool = True):
        super().train(mode)
        checkpoint_in_eval_mode(self.model)  # a no-op unless `gradient_checkpointing` is on
        return self

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

    def _autocast(self):
        """With `base_linears_bf16`, bf16 autocast around the stack's forwards where the caller runs none (a callback
        outside the training step), so that bf16 weights never meet float32 inputs; inside bf16-mixed's own autocast
        (every training step) a no-op."""
        device = self.reward_head.weight.device.type
        if not self.base_linears_bf16 or torch.is_autocast_enabled(device):
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)

    def generate(self, **kwargs) -> torch.Tensor:
        self._use(POLICY)
        merged = self.merged_policy() if self.merge_lora and self._merged else contextlib.nullcontext()
        # no_grad before the cast (generate's own no_grad comes too late for it); merged first: the cast reads the merge
        with self._autocast(), torch.no_grad(), merged, _generation_context(unwrap(self.model), self.fsdp):
            return self.model.generate(**kwargs)

    def merged_policy(self):
        """The policy adapter merged into the base while the block runs, the base put back bit for bit after
        (`ppo.merge`)."""
        return self._merged()

    def logits(self, name: str, ids, mask, pos, keep: int = 0) -> torch.Tensor:
        self._use(name)
        with self._autocast():
            return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                              logits_to_keep=keep).logits  # fmt: skip

    def reward_scores(self, ids, mask) -> torch.Tensor:
        self._use("reward")
        with self._autocast():
            hidden = gather_last(_hidden(self.model, ids, mask, position_ids_from_mask(mask)), mask)  # (B, H)
            return self.reward_head(hidden.to(self.reward_head.weight.dtype)).squeeze(-1).float()

    def values(self, ids, mask, pos) -> torch.Tensor:
        self._use("value")
        with self._autocast():
            hidden = _hidden(self.model, ids, mask, pos)
            return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

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
                        return base_rows(checkpoint_key(name), start, stop)
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
        if hasattr(self, "value_head"):
            shard_module(self.value_head, device_mesh, spec)
        self.fsdp = spec
