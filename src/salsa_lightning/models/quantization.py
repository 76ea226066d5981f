"""QLoRA: a frozen 4-bit NF4 base (bitsandbytes) under trainable LoRA adapters (DESIGN §3, LoRA layout).

Everything here goes through transformers' `BitsAndBytesConfig` and PEFT's `prepare_model_for_kbit_training`;
the one hand-written piece is `_keep_cpu_layout`, a work-around for a bitsandbytes CPU behaviour (see there).

A 4-bit base is only ever frozen: training all its weights, or merging an adapter into it, is refused
(`refuse_full_weights`), since either would need weights bitsandbytes cannot update or store exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from salsa_lightning.errors import SalsaError

if TYPE_CHECKING:
    from salsa_lightning.models.spec import ModelSpec

QUANTIZATIONS = ("none", "nf4")


def is_quantized(spec: ModelSpec) -> bool:
    if spec.quantization not in QUANTIZATIONS:
        raise SalsaError(f"Unknown quantization {spec.quantization!r}; use one of {', '.join(QUANTIZATIONS)}.")
    return spec.quantization != "none"


def compute_dtype() -> torch.dtype:
    """The dtype 4-bit matmuls run in: bf16 on a CUDA GPU that has it, float32 on CPU (bitsandbytes' CPU
    backend is exact only in float32, and CPU bf16 matmuls are slow)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def bnb_config():
    """NF4 with double quantisation (the QLoRA paper's settings)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )


def load_device() -> torch.device:
    """Where a 4-bit model is loaded: bitsandbytes quantises while placing weights, so this must be the device
    the model runs on (the local rank's GPU — Lightning has set it before `configure_model` — or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def quantized_load_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """Extra `from_pretrained` keyword arguments for a quantised load (none when `spec.quantization` is none)."""
    if not is_quantized(spec):
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise SalsaError("`quantization: nf4` needs the bitsandbytes package; pip install bitsandbytes.") from err
    return {"quantization_config": bnb_config(), "device_map": {"": load_device()}}


def prepare_quantized(model, spec: ModelSpec):
    """Make a freshly loaded 4-bit model ready for adapters: PEFT freezes it, upcasts the small non-quantised
    weights (norms, embeddings) to float32 for stable training, and sets up gradient checkpointing if asked."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    _keep_cpu_layout(model)
    return model


def _keep_cpu_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    bitsandbytes (0.50) rewrites a `Linear4bit`'s weight in place into another layout the first time it runs in
    eval mode under no_grad on a CPU with AVX512-BF16, and from then on computes it with a kernel that has no
    backward: later passes that need gradients silently get none through the base (only through the adapters),
    and outputs drift by bf16 rounding. PPO runs its models in eval mode and samples under no_grad, so it would
    hit exactly that. Neither transformers nor PEFT exposes a switch, so we clear the layer's flag by hand."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def refuse_full_weights(spec: ModelSpec, what: str) -> None:
    """A 4-bit base trains only through adapters (QLoRA); say so instead of failing deep inside bitsandbytes."""
    if is_quantized(spec):
        raise SalsaError(
            f"{what} would train or merge full weights of a 4-bit ({spec.quantization}) model, which bitsandbytes "
            "cannot do; set `lora:` (QLoRA) — or `quantization: none` for full fine-tuning."
        )


def quantized_linears(model) -> dict[str, Any]:
    """Every 4-bit linear layer by name (the frozen base's weights, for tests and memory accounting)."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def base_state(model) -> dict[str, torch.Tensor]:
    """A copy of the 4-bit base: packed NF4 weights and their quantisation statistics, per layer, named as in
    the transformers model (PEFT's `base_model.model.` prefix and `.base_layer` dropped, so that a model and its
    adapter-wrapped self compare key for key)."""
    state = {}
    for name, module in quantized_linears(model).items():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        state[f"{name}.weight"] = module.weight.data.clone()
        for key, value in module.weight.quant_state.as_dict(packed=True).items():
            state[f"{name}.weight.{key}"] = value.clone()
    return state


def dequantized_weight(module) -> torch.Tensor:
    """The dense (out, in) weight a 4-bit layer computes with."""
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(module.weight.data, module.weight.quant_state).float()


__all__ = [
    "bnb_config",
    "compute_dtype",
    "is_quantized",
    "prepare_quantized",
    "quantized_load_kwargs",
    "refuse_full_weights",
    "quantized_linears",
    "base_state",
    "dequantized_weight",
]
