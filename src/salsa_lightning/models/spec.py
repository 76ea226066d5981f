"""What to load and how: `ModelSpec` (with its `LoraSpec`), the dtype names every stage accepts, and the named
chat templates. Plain data, no loading code, so that every module can import it without import circles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# The one table of dtype names a config may give; everything that maps names to dtypes reads it.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"

NAMED_CHAT_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}


@dataclass
class LoraSpec:
    """PEFT LoRA settings (`peft.LoraConfig`)."""

    r: int = 16
    """LoRA rank r."""
    alpha: float = 32
    """lora_alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear" (every linear layer but the output head)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling alpha/sqrt(r)."""
    init_lora_weights: bool = True
    """PEFT's default init (B = 0, so training starts exactly at the base model)."""


@dataclass
class ModelSpec:
    """Which model to load and how."""

    name_or_path: str = DEFAULT_MODEL
    """`embedded:smollm2-135m-instruct`, a local HF directory, a stage output directory, or a Hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; auto = bfloat16 on a CUDA GPU that supports it, float32 otherwise."""
    attn_implementation: str | None = None
    """Attention kernel: sdpa, eager, flash_attention_2 (None lets transformers choose)."""
    lora: LoraSpec | None = None
    """Train a LoRA adapter on a frozen base instead of all weights (None = full fine-tuning)."""
    quantization: Literal["none", "nf4"] = "none"
    """Load the frozen base in 4-bit NF4 with double quantisation (bitsandbytes; QLoRA). Needs `lora`; matmuls
    run in bf16 on a GPU, float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository to run. Off unless you trust the repository."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    chat_template: str | None = None
    """Override the tokenizer's chat template: "chatml", "zephyr" (turns end with EOS; for base models such as
    Llama-2/Mistral/Gemma, as the alignment-handbook recipes do), or a Jinja template string."""
    extra_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `from_pretrained`."""
