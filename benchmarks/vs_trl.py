"""PPO side by side: TRL 1.12's `PPOTrainer` against ours (full layout and LoRA layout), same models, same settings.

    python benchmarks/vs_trl.py            # embedded SmolLM2-135M, 2 runs of each system, 1 warm-up + 4 timed updates
    python benchmarks/vs_trl.py --runs 3   # one more run of each (finished runs are kept and not rerun)
    python benchmarks/vs_trl.py --quick    # the tiny test model, 1 run, 1 warm-up + 1 timed update: checks the script
    python benchmarks/vs_trl.py --fresh    # forget the stored runs of this configuration first
    python benchmarks/vs_trl.py --systems ours-lora --src /tmp/old/src --tag=-old   # A/B: ours from other sources
    python benchmarks/vs_trl.py --systems ours-lora --rollout-logprobs --merge-lora   # A/B: ours' options
    python benchmarks/vs_trl.py --precision bf16   # both in bf16 mixed precision (a CPU with bf16, or a GPU's users)
    python benchmarks/vs_trl.py --precision bf16 --systems trl ours-lora-gc --ours-extra=--model.ppo.base_linears_bf16=true

Ours' work-saving options (issue 16; all off by default, so the default runs are the settings below):
`--rollout-logprobs` (`model.ppo.rollout_logprobs`, with `--logprob-check-every N`); `--log-soup-kl` (also measure
the KL to a soup, as SALSA runs do; the soup here is the initial policy itself) with `--logged-kl-every N`
(`model.ppo.logged_kl_every`, which thins that logging-only forward; without a soup it changes nothing);
`--merge-lora` (`model.generation.merge_lora`, LoRA systems only: the full layout has nothing to merge); and
`--ours-extra=ARG` (one more CLI argument for ours, repeatable). A run with any of them is stored in a results folder
named after them (e.g. `...-u5-rlp-soupkl-lkl4-merge`), apart from the default runs; TRL's runs ignore them.

Settings (both systems): batch 8 prompts, exactly 32 new tokens (ours: min_new_tokens = max_new_tokens; TRL: no stop
token, so it always generates `response_length`), 1 PPO epoch, 1 minibatch of 8, β 0.05 (k1 in the reward), lr 3e-6
(AdamW, linear decay, no warm-up), temperature 1.0, top-k/top-p off, fp32 on CPU, the anchor = the initial policy.
`--precision bf16` keeps the fp32 weights and runs both in bf16 mixed precision, as each system's users turn it on:
TRL `bf16=True` (accelerate's autocast around its training forwards), ours `trainer.precision=bf16-mixed` (Lightning's
autocast around each step, generation included). It measures what users of a CPU with native bf16 (AVX512-BF16/AMX)
get; on a CPU without it bf16 is emulated and slow for both. Its runs are stored apart (`...-u5-bf16`).
Models: the policy is the base model itself (ours, LoRA layout: a rank-16 all-linear adapter with B = 0, the same
function); the reward model and the critic are the base with a seeded linear head (LoRA layout: a rank-16 adapter
with B = 0 and the same head). TRL holds 4 fp32 models (policy, reference copy, reward, value); our full layout the
same 4; our LoRA layout one base with adapters; `ours-lora-gc` is the LoRA layout with `model.gradient_checkpointing`
(recomputes each layer in the backward pass: less memory, more time; TRL's runs do not checkpoint).

Each run is a fresh subprocess (so its peak RSS is its own), and runs alternate between systems (TRL, ours full,
ours LoRA, TRL, ...) so that a machine whose speed drifts over the hour drifts for all alike. s/update is wall time
between the ends of consecutive updates after the warm-up one; peak RSS is the process's `ru_maxrss`. The table shows
min-max over runs, and ours as ratios to TRL: samples/s ratio (> 1 = faster than TRL), RSS ratio (< 1 = less).

TRL runs in its own venv (`benchmarks/.venv-trl`, made on first use: torch==2.13.0 CPU build first, then
`benchmarks/vs_trl-requirements.txt`, TRL 1.12.0 and its dependencies pinned); ours in the interpreter running
this script. Every run's numbers are written to `benchmarks/results/vs_trl/<config>/` as it finishes, so an
interrupted comparison resumes where it stopped and the table can be reprinted with `--runs 0`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:  # ours runs with the project's packages; the TRL child imports this file in a venv without Lightning
    from lightning.pytorch.callbacks import Callback
except ImportError:
    Callback = object

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "benchmarks" / ".venv-trl"
REQUIREMENTS = ROOT / "benchmarks" / "vs_trl-requirements.txt"
TORCH = "torch==2.13.0"  # installed first and alone: the CPU build from the local wheel, not gigabytes of CUDA
RESULTS = ROOT / "benchmarks" / "results" / "vs_trl"
EMBEDDED = "embedded:smollm2-135m-instruct"

BATCH, NEW_TOKENS, BETA, LR, TEMPERATURE, LORA_R = 8, 32, 0.05, 3e-6, 1.0, 16
# each system's own switch for the same thing: fp32 weights, and (bf16) autocast to bf16 around the compute
PRECISIONS = {
    "fp32": {"ours": "32-true", "trl_bf16": False, "title": "fp32"},
    "bf16": {"ours": "bf16-mixed", "trl_bf16": True, "title": "bf16 mixed precision, fp32 weights"},
}
SYSTEMS = ("trl", "ours-full", "ours-lora", "ours-lora-gc")
LABELS = {"trl": "TRL 1.12 PPOTrainer", "ours-full": "ours, full layout", "ours-lora": f"ours, LoRA layout (r{LORA_R})",
          "ours-lora-gc": f"ours, LoRA (r{LORA_R}) + grad. checkpointing"}  # fmt: skip


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- the TRL venv
def trl_python() -> Path:
    """The TRL venv's interpreter, creating the venv first if it is missing or incomplete."""
    python = VENV / "bin" / "python"
    probe = "import trl, torch; assert trl.__version__ == '1.12.0'; from trl.experimental.ppo import PPOTrainer"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    print(f"Creating {VENV.relative_to(ROOT)} ({TORCH} first, then {REQUIREMENTS.name}) ...", flush=True)
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "-r", REQUIREMENTS], check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python


# ----------------------------------------------------------------------------- the models, built once per config
def build_inputs(model: str, root: Path, n_prompts: int) -> dict[str, str]:
    """The base, a reward model with a seeded head (full weights and as a LoRA adapter with B = 0 and the same head),
    a policy LoRA adapter with B = 0, and `n_prompts` seeded prompts. Kept in `root` and reused."""
    done = root / "inputs.json"
    if done.is_file():
        return json.loads(done.read_text())
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from salsa_lightning.models.loading import load_tokenizer, resolve_model_path
    from salsa_lightning.models.tiny import save_tiny_checkpoint
    from salsa_lightning.stage import write_manifest

    root.mkdir(parents=True, exist_ok=True)
    base = str(save_tiny_checkpoint(root / "tiny")) if model == "tiny" else resolve_model_path(model)
    tok = load_tokenizer(base)
    torch.manual_seed(0)  # the score head is drawn by transformers' init from the global generator
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    for name, obj in (("rm-full", rm), ("rm-full", tok)):
        obj.save_pretrained(root / name)
    write_manifest(root / "rm-full", {"stage": "reward", "format": "full", "base_model": base})
    lora = dict(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules="all-linear")  # B = 0: no change
    rm_lora = get_peft_model(rm, LoraConfig(**lora, task_type="SEQ_CLS", modules_to_save=["score"]))
    rm_lora.save_pretrained(root / "rm-lora")
    tok.save_pretrained(root / "rm-lora")
    write_manifest(root / "rm-lora", {"stage": "reward", "format": "lora", "base_model": base})
    from transformers import AutoModelForCausalLM

    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**lora))
    sft.save_pretrained(root / "sft-lora")
    tok.save_pretrained(root / "sft-lora")
    write_manifest(root / "sft-lora", {"stage": "sft", "format": "lora", "base_model": base})
    rng = random.Random(0)
    questions = [
        f"What is {rng.randint(10, 99)} {rng.choice('+-*')} {rng.randint(2, 9)}? Explain briefly."
        for _ in range(n_prompts)
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    paths = {"base": base, "rm_full": str(root / "rm-full"), "rm_lora": str(root / "rm-lora"),
             "sft_lora": str(root / "sft-lora"), "prompts": str(root / "prompts.jsonl")}  # fmt: skip
    done.write_text(json.dumps(paths, indent=1))
    return paths


# ----------------------------------------------------------------------------- ours
class UpdateClock(Callback):
    """Records the wall-clock time at the end of every PPO update (one training step = one rollout + update)."""

    ends: list[float] = []

    def on_train_batch_end(self, *args, **kwargs) -> None:
        UpdateClock.ends.append(time.perf_counter())


def option_args(args: argparse.Namespace, paths: dict[str, str], layout: str) -> list[str]:
    """Our CLI's arguments for the work-saving options given on this script's command line (none by default)."""
    out = []
    if args.rollout_logprobs:
        out += ["--model.ppo.rollout_logprobs=true", f"--model.ppo.logprob_check_every={args.logprob_check_every}"]
    if args.log_soup_kl:  # the soup = the initial policy itself (the same numbers), measured as SALSA runs do
        out.append(f"--model.soup={paths['base'] if layout == 'full' else paths['sft_lora']}")
    if args.logged_kl_every != 1:
        out.append(f"--model.ppo.logged_kl_every={args.logged_kl_every}")
    if args.merge_lora and layout == "lora":
        out.append("--model.generation.merge_lora=true")
    return out + list(args.ours_extra)


def option_flags(args: argparse.Namespace) -> list[str]:
    """This script's option flags as given (handed on to each run's subprocess)."""
    flags = [f"--precision={args.precision}", *(["--rollout-logprobs"] if args.rollout_logprobs else []),
             f"--logprob-check-every={args.logprob_check_every}",
             f"--logged-kl-every={args.logged_kl_every}", *(["--log-soup-kl"] if args.log_soup_kl else []),
             *(["--merge-lora"] if args.merge_lora else []), *(f"--ours-extra={a}" for a in args.ours_extra)]  # fmt: skip
    return flags


def option_suffix(args: argparse.Namespace) -> str:
    """The results folder's suffix for the options: empty by default, so the default runs keep their folder."""
    import hashlib

    check = f"c{args.logprob_check_every}" if args.logprob_check_every != 10 else ""
    extra = hashlib.sha1("\0".join(args.ours_extra).encode()).hexdigest()[:8] if args.ours_extra else ""
    return "".join([
        f"-rlp{check}" if args.rollout_logprobs else "", "-soupkl" if args.log_soup_kl else "",
        f"-lkl{args.logged_kl_every}" if args.logged_kl_every != 1 else "", "-merge" if args.merge_lora else "",
        f"-x{extra}" if extra else "",
    ])  # fmt: skip


def ours_args(
    paths: dict[str, str], layout: str, updates: int, checkpointing: bool = False, precision: str = "fp32"
) -> list[str]:
    """Our CLI's arguments for the settings in the module docstring (the options' come from `option_args`)."""
    policy, reward = (paths["base"], paths["rm_full"]) if layout == "full" else (paths["sft_lora"], paths["rm_lora"])
    return [
        "fit", "--model=salsa_lightning.modules.ppo.PPOModule", f"--model.policy_init={policy}",
        f"--model.reward_model={reward}", "--model.anchor=init", f"--model.layout={layout}",
        "--model.model.dtype=float32", "--model.ppo.ppo_epochs=1", f"--model.ppo.mini_batch_size={BATCH}",
        f"--model.ppo.kl_coef={BETA}", "--model.ppo.kl_estimator=k1", f"--model.optim.lr={LR}",
        "--model.optim.warmup_ratio=0.0", "--model.optim.schedule=linear",
        f"--model.generation.max_new_tokens={NEW_TOKENS}", f"--model.generation.min_new_tokens={NEW_TOKENS}",
        f"--model.generation.temperature={TEMPERATURE}", "--model.generation.top_k=0", "--model.generation.top_p=1.0",
        "--model.sample_table_every=0", "--model.kl_hack.action=off",
        "--data=salsa_lightning.data.prompts.PromptDataModule", f"--data.data={paths['prompts']}",
        f"--data.batch_size={BATCH}", f"--trainer.limit_train_batches={updates}", "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.precision={PRECISIONS[precision]['ours']}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.callbacks+=vs_trl.UpdateClock", "--seed_everything=0",
        *(["--model.model.gradient_checkpointing=true"] if checkpointing else []),
    ]  # fmt: skip


def run_ours(paths: dict[str, str], system: str, updates: int, options: argparse.Namespace) -> dict:
    from salsa_lightning.cli import cli_main

    layout = "full" if system == "ours-full" else "lora"
    args = ours_args(paths, layout, updates, checkpointing=system.endswith("-gc"), precision=options.precision)
    cli = cli_main([*args, *option_args(options, paths, layout)])
    import vs_trl  # the CLI instantiated the callback from the module `vs_trl`, not from this `__main__`

    hist = cli.model.history
    phases = ("time/generate", "time/score", "time/forward", "time/optimize")
    timed = hist[1:] or hist
    return {
        "update_ends": vs_trl.UpdateClock.ends,
        "phases_s": {k: sum(h[k] for h in timed) / len(timed) for k in phases},
        "kl_last": hist[-1]["objective/kl"],
    }


# ----------------------------------------------------------------------------- TRL
def run_trl(paths: dict[str, str], updates: int, precision: str = "fp32") -> dict:
    """TRL's PPOTrainer on the same models and prompts (runs inside the TRL venv)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(paths["base"], padding_side="left")
    rows = [json.loads(line) for line in Path(paths["prompts"]).read_text().splitlines()]
    chats = [[{"role": "user", "content": r["prompt"]}] for r in rows]  # as our PromptDataModule encodes them
    ids = [list(tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False)) for c in chats]
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after each PPO update
            ends.append(time.perf_counter())

    def load(cls, path, **kw):
        return cls.from_pretrained(path, dtype=torch.float32, **kw)

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_mini_batches=1,
            local_rollout_forward_batch_size=BATCH, num_ppo_epochs=1, total_episodes=BATCH * updates,
            response_length=NEW_TOKENS, stop_token=None, temperature=TEMPERATURE, kl_coef=BETA, kl_estimator="k1",
            learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, bf16=PRECISIONS[precision]["trl_bf16"],
            fp16=False, use_cpu=True,
            report_to="none", save_strategy="no", num_sample_generations=0, logging_steps=1, disable_tqdm=True,
            seed=0,
        )  # fmt: skip
        trainer = PPOTrainer(
            args=config,
            processing_class=tok,
            model=load(AutoModelForCausalLM, paths["base"]),
            ref_model=load(AutoModelForCausalLM, paths["base"]),
            reward_model=load(AutoModelForSequenceClassification, paths["rm_full"], num_labels=1),
            value_model=load(AutoModelForSequenceClassification, paths["rm_full"], num_labels=1),
            train_dataset=Dataset.from_dict({"input_ids": ids}),
            callbacks=[Clock()],
        )
        trainer.train()
    kls = [h["objective/kl"] for h in trainer.state.log_history if "objective/kl" in h]
    return {"update_ends": ends, "kl_last": kls[-1] if kls else None}


def child(system: str, paths_file: str, updates: int, out: str, options: argparse.Namespace) -> None:
    """One run, in its own process: writes its numbers to `out`."""
    paths = json.loads(Path(paths_file).read_text())
    t0 = time.perf_counter()
    result = (
        run_trl(paths, updates, options.precision) if system == "trl" else run_ours(paths, system, updates, options)
    )
    ends = result.pop("update_ends")
    if len(ends) != updates:
        raise SystemExit(f"{system}: expected {updates} updates, the clock saw {len(ends)}")
    import torch

    Path(out).write_text(json.dumps({
        "system": system, "updates": updates, "s_per_update": [b - a for a, b in zip(ends, ends[1:])],
        "peak_rss_mib": peak_rss_mib(), "wall_s": time.perf_counter() - t0, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_avg_end": os.getloadavg(), **result,
    }, indent=1))  # fmt: skip


# ----------------------------------------------------------------------------- the comparison
def machine() -> str:
    from salsa_lightning.hardware import describe_machine

    return describe_machine()


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """One row per system: s/update min-max over runs (each run's mean), samples/s and peak RSS, ratios to TRL."""
    rows = []
    for system in SYSTEMS:
        runs = results.get(system, [])
        if not runs:
            continue
        per_run = [sum(r["s_per_update"]) / len(r["s_per_update"]) for r in runs]
        rss = [r["peak_rss_mib"] for r in runs]
        rows.append({"system": system, "runs": len(runs), "s_min": min(per_run), "s_max": max(per_run),
                     "s_mean": sum(per_run) / len(per_run), "rss_max_mib": max(rss), "rss_min_mib": min(rss)})  # fmt: skip
    trl = next((r for r in rows if r["system"] == "trl"), None)
    for r in rows:
        r["speed_vs_trl"] = trl["s_mean"] / r["s_mean"] if trl else None  # samples/s ratio = inverse time ratio
        r["rss_vs_trl"] = r["rss_max_mib"] / trl["rss_max_mib"] if trl else None
    return rows


def print_table(rows: list[dict], title: str, notes: list[str]) -> str:
    head = ["system", "runs", "s/update (min-max)", "samples/s", "samples/s vs TRL", "peak RSS", "RSS vs TRL"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = f"{r['speed_vs_trl']:.2f}x" if r["speed_vs_trl"] else "n/a"
        rss_ratio = f"{r['rss_vs_trl']:.2f}x" if r["rss_vs_trl"] else "n/a"
        cells = [LABELS[r["system"]], str(r["runs"]), f"{r['s_min']:.2f} - {r['s_max']:.2f}",
                 f"{BATCH / r['s_mean']:.2f}", ratio, f"{r['rss_max_mib'] / 1024:.2f} GB", rss_ratio]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join([*lines, "", *notes])
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 run, 1 warm-up + 1 timed update")
    parser.add_argument("--model", default=None, help=f"base model (default {EMBEDDED}; --quick: tiny)")
    parser.add_argument("--runs", type=int, default=None, help="runs of each system in total (default 2; quick 1)")
    parser.add_argument("--updates", type=int, default=None, help="updates per run, the first untimed (default 5)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--fresh", action="store_true", help="drop this configuration's stored runs first")
    parser.add_argument(
        "--src",
        type=Path,
        default=ROOT / "src",
        help="the salsa_lightning sources ours runs from (e.g. a checkout of an older commit)",
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32 (the issue's protocol) or bf16 (mixed precision in both systems; fp32 weights)",
    )
    parser.add_argument("--tag", default="", help="appended to the results folder name (e.g. to keep A/B runs apart)")
    ours = parser.add_argument_group("ours' work-saving options (off by default; TRL's runs ignore them)")
    ours.add_argument("--rollout-logprobs", action="store_true", help="model.ppo.rollout_logprobs=true")
    ours.add_argument("--logprob-check-every", type=int, default=10, help="model.ppo.logprob_check_every (default 10)")
    ours.add_argument("--log-soup-kl", action="store_true",
                      help="also log the KL to a soup (= the initial policy), as SALSA runs do")  # fmt: skip
    ours.add_argument("--logged-kl-every", type=int, default=1,
                      help="model.ppo.logged_kl_every (needs a logging-only anchor: --log-soup-kl)")  # fmt: skip
    ours.add_argument("--merge-lora", action="store_true", help="model.generation.merge_lora=true (LoRA systems)")
    ours.add_argument("--ours-extra", action="append", default=[], metavar="ARG",
                      help="one more CLI argument for ours, e.g. --ours-extra=--model.ppo.ppo_epochs=2 (repeatable)")  # fmt: skip
    parser.add_argument("--child", nargs=4, metavar=("SYSTEM", "PATHS", "UPDATES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        system, paths, updates, out = args.child
        return child(system, paths, int(updates), out, args)

    model = args.model or ("tiny" if args.quick else EMBEDDED)
    runs = args.runs if args.runs is not None else (1 if args.quick else 2)
    updates = args.updates or (2 if args.quick else 5)
    if updates < 2:
        parser.error("--updates must be >= 2 (the first one is a warm-up)")
    base_config = f"{model.replace('embedded:', '').replace('/', '_')}-b{BATCH}-t{NEW_TOKENS}-u{updates}"
    config = base_config + ("" if args.precision == "fp32" else f"-{args.precision}") + option_suffix(args) + args.tag
    out_dir = RESULTS / config
    if args.fresh:
        shutil.rmtree(out_dir / "runs", ignore_errors=True)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    inputs = RESULTS / base_config / "inputs"  # A/B tags and options share the models
    paths_file = inputs / "inputs.json"
    build_inputs(model, inputs, n_prompts=BATCH * updates)
    pythons = {s: (trl_python() if s == "trl" else Path(sys.executable)) for s in args.systems}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(args.src.resolve()), str(ROOT / "benchmarks")])}  # fmt: skip
    load_start = os.getloadavg()
    for i in range(1, runs + 1):  # alternate: TRL, ours full, ours LoRA, TRL, ...
        for system in args.systems:
            out = out_dir / "runs" / f"{system}-{i}.json"
            if out.is_file():
                continue
            print(f"run {i}/{runs}: {LABELS[system]} ...", flush=True)
            cmd = [pythons[system], __file__, "--child", system, paths_file, str(updates), out, *option_flags(args)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
                raise SystemExit(f"{system} run {i} failed (exit {proc.returncode}); its output is above.")
            r = json.loads(out.read_text())
            mean = sum(r["s_per_update"]) / len(r["s_per_update"])
            print(f"  {mean:.2f} s/update, peak RSS {r['peak_rss_mib']:.0f} MiB, load avg {r['load_avg_end'][0]:.1f}")
    results: dict[str, list[dict]] = {}
    for f in sorted((out_dir / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        results.setdefault(r["system"], []).append(r)
    rows = summarise(results)
    title = (f"PPO on {model} ({PRECISIONS[args.precision]['title']}, CPU): batch {BATCH}, {NEW_TOKENS} new tokens, 1 epoch x 1 minibatch of {BATCH}, "
             f"beta {BETA}, lr {LR}, 1 warm-up + {updates - 1} timed updates per run")  # fmt: skip
    loads = [r["load_avg_end"][0] for rs in results.values() for r in rs]
    notes = [
        f"machine: {machine()}; torch threads per run: {sorted({r['threads'] for rs in results.values() for r in rs})}",
        f"load average (1 min) at the end of the runs: {min(loads):.1f} - {max(loads):.1f} (before this call: "
        f"{load_start[0]:.1f}); a load above the thread count means another process shared the CPUs",
        "s/update: wall time between update ends (after the warm-up), each run's mean, min-max over runs;",
        "samples/s vs TRL: TRL's mean s/update / this system's (> 1 = faster); RSS vs TRL: peak RSS / TRL's (< 1 = less).",
        f"ours from {args.src}; runs stored in {out_dir.relative_to(ROOT)}/runs (--runs N adds, --fresh redoes)",
        *([f"ours' options: {' '.join(option_args(args, {'base': 'BASE', 'sft_lora': 'SFT'}, 'lora'))}"]
          if option_suffix(args) else []),
    ]  # fmt: skip
    text = print_table(rows, title, notes)
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "summary.json").write_text(json.dumps({"rows": rows, "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
