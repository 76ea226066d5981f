"""PPO update cost, split by phase, for a tiny model and the embedded SmolLM2-135M, in both memory layouts.

    python benchmarks/ppo_step.py                 # tiny + embedded, full + lora
    python benchmarks/ppo_step.py --models tiny   # quick

For each (model, layout), in a fresh subprocess (so peak RSS is that configuration's alone): runs a few PPO
updates through the real CLI, prints mean seconds per update split into generate / score / forward
(policy + anchors + critic) / optimise, samples per second and peak RSS; then times the stack's generate
against a bare `model.generate` (plain transformers/PEFT model, same prompts, same seed, same settings).
Targets (issue 6): generate phase <= 1.1x bare generate; LoRA peak RSS <= 1.5x the full-weight policy alone.
The adapters are random (no training needed to measure cost).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, NEW_TOKENS, UPDATES = 8, 32, 3


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def build_inputs(model: str, root: Path) -> dict[str, str]:
    """An SFT LoRA adapter, a reward LoRA adapter (with head) and prompts on `model`'s base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from salsa_lightning.models.loading import load_tokenizer, resolve_model_path
    from salsa_lightning.models.tiny import save_tiny_checkpoint
    from salsa_lightning.stage import write_manifest

    base = str(save_tiny_checkpoint(root / "tiny")) if model == "tiny" else resolve_model_path(model)
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(base)
    sft = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    sft.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    write_manifest(root / "sft", {"stage": "sft", "format": "lora", "base_model": base})
    cls = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    cls.config.pad_token_id = tok.pad_token_id
    rm = get_peft_model(
        cls,
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"]),
    )
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    write_manifest(root / "rm", {"stage": "reward", "format": "lora", "base_model": base})
    questions = [f"What is {a} + {b}? Answer briefly." for a in range(8) for b in range(4)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return {"base": base, "sft": str(root / "sft"), "rm": str(root / "rm"), "prompts": str(root / "prompts.jsonl")}


def child(model: str, layout: str, root: str) -> None:
    """One configuration, in its own process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from salsa_lightning.cli import cli_main

    paths = json.loads((Path(root) / "paths.json").read_text())
    args = [
        "fit", "--model=salsa_lightning.modules.ppo.PPOModule", f"--model.policy_init={paths['sft']}",
        f"--model.reward_model={paths['rm']}", f"--model.soup={paths['sft']}", f"--model.layout={layout}",
        "--model.ppo.mini_batch_size=4", f"--model.generation.max_new_tokens={NEW_TOKENS}", "--model.sample_table_every=0",
        "--data=salsa_lightning.data.prompts.PromptDataModule", f"--data.data={paths['prompts']}", f"--data.batch_size={BATCH}",
        f"--trainer.limit_train_batches={UPDATES}", "--trainer.max_epochs=1", "--trainer.accelerator=cpu",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--seed_everything=0",
    ]  # fmt: skip
    t0 = time.perf_counter()
    cli = cli_main(args)
    wall = time.perf_counter() - t0
    hist = cli.model.history[1:] or cli.model.history  # the first update pays one-off warm-up costs
    phases = {
        k: statistics.mean(h[k] for h in hist) for k in ("time/generate", "time/score", "time/forward", "time/optimize")
    }
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    module = cli.model
    batch = next(iter(cli.datamodule.train_dataloader()))
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1.0, top_k=None, top_p=1.0,
               pad_token_id=module.tokenizer.pad_token_id, eos_token_id=module.tokenizer.eos_token_id)  # fmt: skip
    bare = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    if layout == "lora":
        bare = PeftModel.from_pretrained(bare, paths["sft"]).eval()
    else:  # the same weights the full layout's policy has now
        bare.load_state_dict(module.stack.policy.state_dict())
    ours, theirs = [], []
    with torch.no_grad():
        for rep in range(3):
            torch.manual_seed(rep)
            t = time.perf_counter()
            module.stack.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **gen)
            ours.append(time.perf_counter() - t)
            torch.manual_seed(rep)
            t = time.perf_counter()
            bare.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **gen)
            theirs.append(time.perf_counter() - t)
    per_update = sum(phases.values())
    print(json.dumps({
        "model": model, "layout": layout, "updates": len(cli.model.history), "wall_s": wall, **phases,
        "s_per_update": per_update, "samples_per_s": BATCH / per_update, "peak_rss_mib": peak_mib,
        "stack_generate_s": statistics.median(ours), "bare_generate_s": statistics.median(theirs),
    }))  # fmt: skip


def policy_alone_rss(root: str) -> None:
    """Peak RSS of the full-weight policy alone (loaded, one generate): the LoRA layout's yardstick."""
    import torch
    from transformers import AutoModelForCausalLM

    paths = json.loads((Path(root) / "paths.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    with torch.no_grad():
        model.generate(input_ids=torch.randint(5, 100, (BATCH, 24)), max_new_tokens=NEW_TOKENS, do_sample=True)
    print(json.dumps({"policy_alone_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "embedded:smollm2-135m-instruct"])
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "LAYOUT", "ROOT"))
    parser.add_argument("--policy-alone", metavar="ROOT")
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.policy_alone:
        return policy_alone_rss(args.policy_alone)

    from rich.console import Console
    from rich.table import Table

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    table = Table(title=f"PPO update cost (batch {BATCH}, {NEW_TOKENS} new tokens, CPU threads {os.cpu_count()})")
    for col in ["model", "layout", "generate s", "score s", "fwd s", "optim s", "s/update", "samples/s",
                "peak RSS MiB", "gen / bare gen", "RSS / policy alone"]:  # fmt: skip
        table.add_column(col, justify="right")
    for model in args.models:
        with tempfile.TemporaryDirectory() as root:
            _write_json(Path(root) / "paths.json", build_inputs(model, Path(root)))
            alone = json.loads(subprocess.run([sys.executable, __file__, "--policy-alone", root], env=env, check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])  # fmt: skip
            for layout in ("full", "lora"):
                out = subprocess.run([sys.executable, __file__, "--child", model, layout, root], env=env,
                                     capture_output=True, text=True)  # fmt: skip
                if out.returncode:
                    print(out.stderr[-3000:])
                    raise SystemExit(out.returncode)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(r))
                table.add_row(
                    model.replace("embedded:", ""), layout, f"{r['time/generate']:.2f}", f"{r['time/score']:.2f}",
                    f"{r['time/forward']:.2f}", f"{r['time/optimize']:.2f}", f"{r['s_per_update']:.2f}",
                    f"{r['samples_per_s']:.2f}", f"{r['peak_rss_mib']:.0f}",
                    f"{r['stack_generate_s'] / r['bare_generate_s']:.2f}x",
                    f"{r['peak_rss_mib'] / alone['policy_alone_rss_mib']:.2f}x",
                )  # fmt: skip
    Console().print(table)
    print("Targets: gen / bare gen <= 1.10x; LoRA layout RSS / policy alone <= 1.5x.")


if __name__ == "__main__":
    main()
