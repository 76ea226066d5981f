"""Benchmark: per-GPU memory of SALSA's PPO stage — estimated at paper scale, measured on small models.

    PYTHONPATH=src python benchmarks/memory.py [--models tiny embedded] [--json out.json]

1. Estimates (`salsa_lightning.memory`) for Llama-2-7B, SALSA PPO, batch 8 × (512 prompt + 512 response) tokens
   per rank, bf16, gradient checkpointing: full-weight FSDP on 8 GPUs (bf16-mixed and bf16-true), and QLoRA on
   one GPU.
2. Measurements on the tiny test model and the embedded SmolLM2-135M, in the real PPO stacks (`FullStack`,
   `LoraStack` with and without a 4-bit base), one process, on CPU in float32: the bytes of every weight,
   gradient and AdamW state tensor after one PPO-like update, and the bytes autograd keeps for backward
   (counted with `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded). These
   are the quantities the estimator adds up, so measured/estimated checks it component by component. (On a
   GPU the same run would also show allocator overhead; the static and activation terms are the same.)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from salsa_lightning.memory import LLAMA2_7B, Arch, GiB, Workload, estimate, estimate_summary  # noqa: E402


def paper_scale() -> list[dict]:
    work = Workload(batch_size=8, prompt_length=512, response_length=512, dtype="bfloat16", gradient_checkpointing=True)
    return [
        {"name": "7B full-weight FSDP, 8 GPUs, bf16-mixed", **estimate_summary(LLAMA2_7B, "full", work, world_size=8)},
        {
            "name": "7B full-weight FSDP, 8 GPUs, bf16-true",
            **estimate_summary(LLAMA2_7B, "full", Workload(**{**work.__dict__, "master_weights_fp32": False}), 8),
        },
        {"name": "7B QLoRA, 1 GPU", **estimate_summary(LLAMA2_7B, "qlora", work, world_size=1)},
        {"name": "7B LoRA (bf16 base), 1 GPU", **estimate_summary(LLAMA2_7B, "lora", work, world_size=1)},
    ]


# ----------------------------------------------------------------------------- measurement
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def quant_state_tensors(module) -> list[torch.Tensor]:
    """The 4-bit layers' quantisation statistics (absmax, nested absmax, code): weights too, not parameters."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    out = []
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None:
            out += [v for v in m.weight.quant_state.as_dict(packed=True).values() if isinstance(v, torch.Tensor)]
    return out


class SavedTensors:
    """Counts the bytes autograd saves for backward (activations), each storage once, parameters excluded."""

    def __init__(self, exclude: set[tuple[int, int]]):
        self.exclude, self.seen, self.bytes = exclude, set(), 0

    def pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self.exclude and key not in self.seen and key[0] != 0:
            self.seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def measure_stack(stack, arch: Arch, work: Workload) -> dict[str, float]:
    """One PPO-like update (policy log-probs and critic values of a batch, joint backward, AdamW step)."""
    from salsa_lightning.rl import logprobs_from_logits, position_ids_from_mask, response_logits

    stack.eval()
    trainable = [p for p in stack.parameters() if p.requires_grad]
    frozen = [p for p in stack.parameters() if not p.requires_grad] + quant_state_tensors(stack)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, arch.vocab_size, (work.batch_size, work.prompt_length + work.response_length), generator=g)
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    response = ids[:, work.prompt_length :]
    exclude = {_storage_key(t) for t in trainable + frozen}
    with SavedTensors(exclude) as saved:
        logp = logprobs_from_logits(
            response_logits(stack.logits("policy", ids, mask, pos), work.response_length), response
        )
        values = stack.values(ids, mask, pos)
    loss = -logp.mean() + values.square().mean()
    loss.backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    out = {
        "trainable_weights": tensor_bytes(trainable),
        "frozen_weights": tensor_bytes(frozen),
        "gradients": tensor_bytes([p.grad for p in trainable if p.grad is not None]),
        "optimizer_state": tensor_bytes(state),
        "saved_for_backward": saved.bytes,
    }
    del opt, loss, logp, values
    return out


def _adapter_dirs(base: str, root: Path, r: int) -> dict[str, str]:
    """A policy/init adapter (rank r), a rank-2r adapter standing in for the cat soup of two rank-r seeds (the same
    size), and a reward adapter with its head — saved like the SFT, soup and reward stages save them."""
    from salsa_lightning.models.loading import LoraSpec, ModelSpec, load_causal_lm
    from salsa_lightning.reward.model import load_reward_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        load_causal_lm(ModelSpec(base, lora=LoraSpec(r=r, dropout=0.0)), trainable=True).save_pretrained(root / "sft")
        load_causal_lm(ModelSpec(base, lora=LoraSpec(r=2 * r, alpha=64, dropout=0.0)), trainable=True).save_pretrained(
            root / "soup"
        )
        rm = load_reward_model(ModelSpec(str(root / "sft"), lora=LoraSpec(r=r, dropout=0.0)), trainable=True)
        rm.save_pretrained(root / "rm")
    return {"sft": str(root / "sft"), "soup": str(root / "soup"), "rm": str(root / "rm")}


def measure_model(name: str, base: str, arch: Arch, work: Workload, layouts: list[str]) -> list[dict]:
    from salsa_lightning.models.loading import ModelSpec
    from salsa_lightning.ppo.build import FullStack, LoraStack

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _adapter_dirs(base, Path(tmp), work.lora_r) if set(layouts) & {"lora", "qlora"} else {}
        for layout in layouts:
            if layout == "full":
                stack = FullStack(ModelSpec(dtype="float32"), base, {"init": base, "soup": base}, base, "copy")
            else:
                spec = ModelSpec(dtype="float32", quantization="nf4" if layout == "qlora" else "none")
                anchors = {"init": dirs["sft"], "soup": dirs["soup"]}
                stack = LoraStack(spec, dirs["sft"], anchors, dirs["rm"], "copy")
            measured = measure_stack(stack, arch, work)
            est = estimate(arch, layout, work)
            est["saved_for_backward"] = est["activations"] + est["logits_saved"]
            rows.append(
                {
                    "model": name,
                    "layout": layout,
                    "params": arch.params,
                    "MiB": {
                        k: {
                            "measured": round(v / 2**20, 3),
                            "estimated": round(est[k] / 2**20, 3),
                            "ratio": round(v / est[k], 3),
                        }
                        for k, v in measured.items()
                    },
                }
            )
            del stack
            gc.collect()
    return rows


def tiny_base(root: Path) -> tuple[str, Arch]:
    from transformers import AutoConfig

    from salsa_lightning.models.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint(root / "tiny", seed=0, hidden_size=64)
    return str(path), Arch.from_config(AutoConfig.from_pretrained(path))


def embedded_base() -> tuple[str, Arch]:
    from transformers import AutoConfig

    from salsa_lightning.models.loading import resolve_model_path

    path = resolve_model_path("embedded:smollm2-135m-instruct")
    return path, Arch.from_config(AutoConfig.from_pretrained(path))


def print_estimates(rows: list[dict]) -> None:
    for row in rows:
        gib = row["GiB"]
        parts = ", ".join(f"{k} {v}" for k, v in gib.items() if k != "total")
        print(f"{row['name']}: {gib['total']} GiB per GPU ({parts})")


def print_measurements(rows: list[dict]) -> None:
    print(f"{'model':10} {'layout':7} {'component':18} {'measured MiB':>13} {'estimated MiB':>14} {'ratio':>6}")
    for row in rows:
        for k, v in row["MiB"].items():
            print(
                f"{row['model']:10} {row['layout']:7} {k:18} {v['measured']:13.3f} {v['estimated']:14.3f} {v['ratio']:6.3f}"
            )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["tiny", "embedded"], choices=["tiny", "embedded"])
    parser.add_argument("--layouts", nargs="*", default=["full", "lora", "qlora"], choices=["full", "lora", "qlora"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    estimates = paper_scale()
    print_estimates(estimates)
    work = Workload(
        batch_size=args.batch_size,
        prompt_length=args.prompt_length,
        response_length=args.response_length,
        dtype="float32",
        gradient_checkpointing=False,
        lora_r=8,
    )
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            base, arch = tiny_base(Path(tmp)) if name == "tiny" else embedded_base()
            measured += measure_model(name, base, arch, work, args.layouts)
    print_measurements(measured)
    result = {"estimates": estimates, "measured": measured, "GiB": GiB}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
