"""Per-GPU memory of a SALSA run, estimated from parameter counts and the memory layout (DESIGN §3).

Two layouts matter for PPO, the stage that holds the most models at once:
  - `full`: policy and critic train (weights, gradients, AdamW state); the init anchor, the soup anchor and the
    reward model are frozen copies. Under FSDP every one of them is sharded over `world_size` ranks, and one
    decoder layer at a time (two with prefetch) is gathered whole to compute.
  - `qlora`: ONE frozen base — its linear weights in 4-bit NF4 with double quantisation, the rest (embeddings,
    norms) in float32 after PEFT's `prepare_model_for_kbit_training` — carries the adapters policy, init,
    soup, reward and value; only policy and value train.
  - `lora`: the same with a bf16 (or fp32) base.

Activations are counted per token and decoder layer from what a Llama layer keeps for its backward pass (see
`saved_per_token`); with gradient checkpointing only each layer's input is kept, plus one layer's worth while
it is recomputed. PPO's biggest single tensors are the logits over the vocabulary, counted separately.
This is an estimate for planning (what fits where), checked against measurement by `benchmarks/memory.py`;
allocator fragmentation, CUDA context (~0.5 GB) and communication buffers are not in it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4: 4 bits per weight; double quantisation stores an 8-bit absmax per 64-weight block and an fp32 scale per
# 256 blocks (QLoRA paper §3): 0.5 + 1/64 + 4/(64*256) bytes per weight.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only (Llama-family) model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> Arch:
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.hidden_size // self.num_heads * self.num_kv_heads

    @property
    def layer_linear_params(self) -> int:
        """Weights of one decoder layer's linear maps (q, k, v, o, gate, up, down): what 4-bit quantises."""
        h, i = self.hidden_size, self.intermediate_size
        return h * h * 2 + h * self.kv_dim * 2 + 3 * h * i

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.layer_linear_params

    @property
    def other_params(self) -> int:
        """Embeddings, the LM head when untied, and the RMSNorm weights: kept out of 4-bit."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embed + self.hidden_size * (2 * self.num_layers + 1)

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        """One all-linear LoRA adapter of rank r: A (r, in) and B (out, r) on each of the seven linear maps."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)
        return self.num_layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)

    def saved_per_token(self, dtype_bytes: int, lora: bool = False) -> float:
        """Bytes one decoder layer keeps for backward, per token (no checkpointing, SDPA attention, no dropout).

        Attention block: the RMSNorm's input in fp32 and its normalised output (2h + 4h/dtype), the q/k/v
        input (h, shared), q, k, v after RoPE and SDPA's output (h + 2kv + h), the o-projection input (h).
        MLP block: the second RMSNorm (as above), gate and up outputs, SiLU(gate) and the product that feeds
        the down-projection (4i). With LoRA each adapted map also keeps its rank-r intermediate (negligible).
        """
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        norm = h * (1 + 4 / dtype_bytes)  # fp32 upcast of the input + the normalised output
        attention = norm + h + (h + 2 * kv) + h + h
        mlp = norm + 4 * i
        return (attention + mlp) * dtype_bytes * (1.05 if lora else 1.0)


LLAMA2_7B = Arch(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Workload:
    """What one PPO update processes per rank."""

    batch_size: int = 8
    """Rollout rows per rank (also the rows of one forward/backward minibatch: the conservative case)."""
    prompt_length: int = 512
    response_length: int = 512
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Compute dtype (and weight dtype of full-precision models)."""
    master_weights_fp32: bool = True
    """Trainable weights, gradients and AdamW state in fp32 (Lightning `bf16-mixed`); False = all in `dtype`
    (`bf16-true`: half the memory, the paper's setting for 7B)."""
    gradient_checkpointing: bool = True
    lora_r: int = 16


def estimate(
    arch: Arch, layout: Literal["full", "lora", "qlora"], work: Workload, world_size: int = 1
) -> dict[str, float]:
    """Bytes per rank, by component, for one PPO update of SALSA (policy + critic training; init anchor, soup
    anchor and reward model frozen). `world_size` shards every model (FSDP, full layout only)."""
    d = DTYPE_BYTES[work.dtype]
    out: dict[str, float] = {}
    if layout == "full":
        n = arch.params
        train_bytes = 4 if work.master_weights_fp32 else d
        # AdamW keeps two moments in the dtype of the weights it steps
        out["trainable_weights"] = 2 * n * train_bytes / world_size  # policy + critic
        out["gradients"] = 2 * n * train_bytes / world_size
        out["optimizer_state"] = 2 * n * 2 * train_bytes / world_size
        out["frozen_weights"] = 3 * n * d / world_size  # init anchor, soup anchor, reward model
        if world_size > 1:
            # the layer being computed and the prefetched next one, gathered whole in the compute dtype
            out["gathered_layers"] = 2 * arch.layer_linear_params * d
    else:
        base = arch.linear_params * (NF4_BYTES if layout == "qlora" else d)
        # prepare_model_for_kbit_training upcasts embeddings/norms to fp32 on a 4-bit base
        base += arch.other_params * (4 if layout == "qlora" else d)
        lora = arch.lora_params(work.lora_r)
        out["frozen_weights"] = (
            base + 4 * lora * 4
        )  # fp32 adapters init (r), soup (2r: the cat of two seeds), reward (r)
        out["trainable_weights"] = 2 * lora * 4  # policy and value adapters in fp32
        out["gradients"] = 2 * lora * 4
        out["optimizer_state"] = 2 * lora * 8
    tokens = work.batch_size * (work.prompt_length + work.response_length)
    per_layer = arch.saved_per_token(d, lora=layout != "full") * tokens
    # policy and critic run separate forward passes whose graphs both live until the joint backward
    if work.gradient_checkpointing:
        out["activations"] = 2 * (arch.num_layers * arch.hidden_size * d * tokens + per_layer)
    else:
        out["activations"] = 2 * arch.num_layers * per_layer
    # the log-softmax over the response positions (fp32) is kept for backward; while it is computed, the model's
    # logits over every position (in `dtype`) and their fp32 copy exist too
    response_vocab = work.batch_size * work.response_length * arch.vocab_size
    out["logits_saved"] = response_vocab * 4
    out["logits_transient"] = tokens * arch.vocab_size * d + response_vocab * 4
    # generation: the KV cache of the rollout (keys and values, every layer)
    out["kv_cache"] = 2 * arch.num_layers * tokens * arch.kv_dim * d
    # generation (no_grad, KV cache) and the update (activations, logits) happen one after the other
    static = sum(v for k, v in out.items() if k not in {"activations", "logits_saved", "logits_transient", "kv_cache"})
    update = out["activations"] + out["logits_saved"] + out["logits_transient"]
    out["total"] = static + max(update, out["kv_cache"])
    return out


def estimate_summary(arch: Arch, layout: str, work: Workload, world_size: int = 1) -> dict:
    est = estimate(arch, layout, work, world_size)
    return {
        "layout": layout,
        "world_size": world_size,
        "params": arch.params,
        "workload": asdict(work),
        "GiB": {k: round(v / GiB, 2) for k, v in est.items()},
    }


__all__ = ["Arch", "Workload", "LLAMA2_7B", "estimate", "estimate_summary", "NF4_BYTES", "GiB"]
