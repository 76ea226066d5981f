"""`build_stack`: the one way to make a PPO `Stack`, in either layout, sharded or not."""

from __future__ import annotations

from typing import Any, Literal

import torch

from salsa_lightning.distributed import (
    FSDPSpec,
)
from salsa_lightning.models.loading import (
    is_adapter_dir,
    resolve_model_path,
)
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.ppo.anchors import InMemorySoup
from salsa_lightning.ppo.config import check_merge_lora
from salsa_lightning.ppo.full_stack import FullStack
from salsa_lightning.ppo.lora_stack import LoraStack
from salsa_lightning.ppo.stack import Stack


def resolve_layout(
    layout: str, policy_init: str, anchors: dict[str, str | InMemorySoup], reward: str | None
) -> Literal["full", "lora"]:
    """`layout` itself, or for `auto`: lora when every model is an adapter, else full."""
    if layout != "auto":
        return layout
    adapters = [policy_init, *([reward] if reward else [])]
    for anchor in anchors.values():
        adapters += list(anchor.inputs) if isinstance(anchor, InMemorySoup) else [anchor]
    return "lora" if all(is_adapter_dir(resolve_model_path(p)) for p in adapters) else "full"


def build_stack(
    layout: str,
    spec: ModelSpec,
    policy_init: str,
    anchors: dict[str, str | InMemorySoup],
    reward: str | None,
    value_head: str,
    sharding: tuple[Any, FSDPSpec] | None = None,
    critic: bool = True,
    merge_lora: bool = False,
    base_linears_bf16: bool = False,
    merge_restore: str = "copy",
) -> Stack:
    """The stack for `layout` (`auto`: lora when every model is an adapter), sharded per decoder layer when
    `sharding` = (device mesh, FSDPSpec) is given, in eval mode (no dropout: rollout and update log-probs must come
    from the same function). `critic=False`: no value model (critic-free advantage estimators). `merge_lora`: the
    LoRA layout generates with the policy adapter merged (`GenerationSpec.merge_lora`), refused where it cannot, the
    base put back as `merge_restore` says (`GenerationSpec.merge_restore`).
    `base_linears_bf16`: the LoRA layout's frozen Linear weights in bf16 (`PPOSpec.base_linears_bf16`; the module
    checks it against the precision first)."""
    layout = resolve_layout(layout, policy_init, anchors, reward)
    if merge_lora:
        from salsa_lightning.models.quantization import is_quantized

        check_merge_lora(layout, is_quantized(spec), sharding is not None)
    if layout == "full":
        from salsa_lightning.models.quantization import refuse_full_weights

        refuse_full_weights(spec, "PPO's full layout (separate full-weight models)")
    # PEFT draws random initial LoRA weights before loading saved ones; fork the RNG so that which anchors are
    # loaded never changes the rollouts (PPO and SALSA runs then share sampling noise)
    with torch.random.fork_rng(devices=[]):
        if layout == "full":
            stack = FullStack(spec, policy_init, anchors, reward, value_head, sharding, critic)
        else:
            stack = LoraStack(spec, policy_init, anchors, reward, value_head, sharding, critic, merge_lora,
                              base_linears_bf16, merge_restore)  # fmt: skip
    if sharding is not None:
        stack.shard(*sharding)
    return stack.eval()


__all__ = ["FullStack", "LoraStack", "build_stack", "resolve_layout"]
