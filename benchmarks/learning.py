"""Learning curves like CleanRL's, on a task with a known answer: RL from the quickstart's SFT seed 1 with the task
suite's gold judge as the reward (RLVR), held-out gold measured greedily every K updates.

    python benchmarks/learning.py                                  # GAE and GRPO x init and soup anchors, seed 1
    python benchmarks/learning.py --arms grpo:soup gae:init --seeds 1 2 --updates 32 --eval-every 8
    python benchmarks/learning.py --arms gae:init --rollout-logprobs --logged-kl-every 4 --merge-lora   # ours' options

The work-saving options (issue 16; off by default) map to `model.ppo.rollout_logprobs` (`--logprob-check-every N`),
`model.ppo.logged_kl_every` and `model.generation.merge_lora`; `--extra=ARG` passes any further CLI argument
(repeatable). An arm run with any of them is cached apart from the default arms (its folder name says which).

Each arm (estimator:anchor, seed) runs `configs/quickstart/rlvr-*.yaml` through the real CLI in a subprocess, with
`GoldCurve` (below) as an extra callback. It prints a table — gold before, gold after, the paired gain over prompts
with a bootstrap 95% interval, KL to init and to the soup at the last update, seconds per update, wall time; then,
for each estimator run with both anchors, soup minus init in final gold paired by seed and prompt — and
writes `results.json`, `table.md` and `curves.png` under `--out`. A finished arm is cached (`arm.json`) and skipped on
a re-run; the quickstart's SFT seeds and soup are built first if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from salsa_lightning.hardware import describe_machine

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / "outputs" / "quickstart"
CONFIGS = {
    ("gae", "init"): "rlvr-ppo",
    ("gae", "soup"): "rlvr-salsa",
    ("grpo", "init"): "rlvr-grpo",
    ("grpo", "soup"): "rlvr-salsa-grpo",
}
PREREQUISITES = [  # (output, command): the quickstart steps RL starts from
    (QS / "data", ["data", "--config", "configs/quickstart/data.yaml"]),
    (QS / "sft-seed1", ["fit", "--config", "configs/quickstart/sft.yaml", "--seed_everything", "1"]),
    (QS / "sft-seed2", ["fit", "--config", "configs/quickstart/sft.yaml", "--seed_everything", "2"]),
    (QS / "soup", ["soup", "--config", "configs/quickstart/soup.yaml"]),
]


class GoldCurve(Callback):
    """Held-out gold score of the policy, greedy, on the suite's eval prompts: before training, every `every`
    updates, and at the end; written to `path` as {"points": [{"update", "<split>": [score per prompt]}]}.

    Greedy decoding makes the update-0 point a function of the SFT start alone, so with `start_cache` it is computed
    once and shared by every arm that starts from the same policy (same files, same eval settings)."""

    def __init__(
        self,
        path: str,
        eval_files: dict[str, str],
        every: int = 8,
        max_new_tokens: int = 48,
        start_cache: str | None = None,
    ):
        self.path, self.eval_files, self.every, self.max_new_tokens = Path(path), eval_files, every, max_new_tokens
        self.start_cache = Path(start_cache) if start_cache else None
        self.points: list[dict] = []

    def _start_key(self, pl_module) -> str:
        init = Path(str(pl_module.hparams.get("policy_init", "")))
        stamps = sorted((f.name, f.stat().st_mtime_ns) for f in init.glob("*.safetensors")) if init.is_dir() else []
        return json.dumps([str(init.resolve()), stamps, self.eval_files, self.max_new_tokens])

    def _evaluate(self, pl_module) -> None:
        from salsa_lightning.data import judge
        from salsa_lightning.data.prompts import prompt_messages
        from salsa_lightning.data.sources import load_rows
        from salsa_lightning.evaluation.generation import encode_prompts, generate_responses

        point = {"update": pl_module.updates_done}
        for split, source in self.eval_files.items():
            rows = [dict(r) for r in load_rows(source, split="test")]
            messages = [prompt_messages(r, i) for i, r in enumerate(rows)]
            ids, _ = encode_prompts(pl_module.tokenizer, messages, 512)
            pl_module.stack.eval()
            out = generate_responses(pl_module.stack, pl_module.tokenizer, ids, self.max_new_tokens, batch_size=16)
            point[split] = judge.gold_reward(messages, [g.text for g in out])
        self.points.append(point)
        self.path.write_text(json.dumps({"points": self.points}))

    def on_train_start(self, trainer, pl_module) -> None:
        key = self._start_key(pl_module)
        if self.start_cache is not None and self.start_cache.exists():
            cached = json.loads(self.start_cache.read_text())
            if cached["key"] == key:
                self.points.append(cached["point"])
                self.path.write_text(json.dumps({"points": self.points}))
                return
        self._evaluate(pl_module)
        if self.start_cache is not None:
            self.start_cache.write_text(json.dumps({"key": key, "point": self.points[0]}))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = pl_module.updates_done
        if outputs:  # one line per update: the run's progress bar is off so that the log stays readable
            print(f"update {done}: train score {float(outputs.get('objective/scores', float('nan'))):.3f}", flush=True)
        if outputs and done % self.every == 0 and self.points[-1]["update"] != done:
            self._evaluate(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.points[-1]["update"] != pl_module.updates_done:
            self._evaluate(pl_module)


def ensure_quickstart(python: str, precision: str) -> None:
    for out, args in PREREQUISITES:
        if not out.exists():
            print(f"== building {out.relative_to(ROOT)}", flush=True)
            extra = [f"--trainer.precision={precision}"] if args[0] == "fit" else []
            subprocess.run([python, "-m", "salsa_lightning", *args, *extra], cwd=ROOT, check=True)


def update_args(config: str, updates: int, extra: list[str] = ()) -> list[str]:
    """Trainer limits that give exactly `updates` rollouts: `limit_train_batches` caps each epoch, so a run longer than
    one pass over the prompts (GAE's 16 prompts a rollout: 8 per epoch of the suite's 128) needs several epochs."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "quickstart" / f"{config}.yaml").read_text())
    data = cfg["data"]["init_args"]
    rows = sum(1 for line in (ROOT / data["data"]).read_text().splitlines() if line.strip())
    batch = data["batch_size"]
    for arg in extra:  # an override of the prompt batch changes the rollouts per epoch
        key, _, value = arg.partition("=")
        if key in ("--data.batch_size", "--data.init_args.batch_size"):
            batch = int(value)
    per_epoch = rows // batch
    epochs = -(-updates // per_epoch)
    if updates % epochs:
        raise SystemExit(
            f"--updates {updates} is not a whole number of epochs of {per_epoch} rollouts; pick a multiple."
        )
    return [f"--trainer.limit_train_batches={updates // epochs}", f"--trainer.max_epochs={epochs}"]


def option_args(args: argparse.Namespace) -> list[str]:
    """The CLI arguments of the work-saving options given on this script's command line (none by default)."""
    out = []
    if args.rollout_logprobs:
        out += ["--model.ppo.rollout_logprobs=true", f"--model.ppo.logprob_check_every={args.logprob_check_every}"]
    if args.logged_kl_every != 1:
        out.append(f"--model.ppo.logged_kl_every={args.logged_kl_every}")
    if args.merge_lora:
        out.append("--model.generation.merge_lora=true")
    return out + list(args.extra)


def option_suffix(args: argparse.Namespace) -> str:
    """The arm folder's suffix for the options: empty by default, so the default arms keep their cache."""
    import hashlib

    check = f"c{args.logprob_check_every}" if args.logprob_check_every != 10 else ""
    extra = args.tag or (hashlib.sha1("\0".join(args.extra).encode()).hexdigest()[:8] if args.extra else "")
    return "".join([
        f"-rlp{check}" if args.rollout_logprobs else "",
        f"-lkl{args.logged_kl_every}" if args.logged_kl_every != 1 else "", "-merge" if args.merge_lora else "",
        f"-x{extra}" if extra else "",
    ])  # fmt: skip


def run_arm(
    python: str,
    estimator: str,
    anchor: str,
    seed: int,
    updates: int,
    every: int,
    out: Path,
    precision: str,
    options: list[str] | None = None,
) -> dict:
    cached = out / "arm.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        if result.get("precision", precision) == precision:  # (a record from before precisions were kept: reused)
            print(f"== {out.name}: cached", flush=True)
            return result
        print(f"== {out.name}: cached at {result['precision']}, run again at {precision}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    evals = {"id": str(QS / "data" / "eval_id.jsonl"), "ood": str(QS / "data" / "eval_ood.jsonl")}
    cmd = [
        python, "-m", "salsa_lightning", "fit", "--config", f"configs/quickstart/{CONFIGS[(estimator, anchor)]}.yaml",
        f"--seed_everything={seed}", *update_args(CONFIGS[(estimator, anchor)], updates, options or []),
        f"--trainer.precision={precision}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--model.sample_table_every=0",
        f"--model.output_dir={out / 'policy'}", "--model.overwrite=true",
        "--trainer.callbacks+=learning.GoldCurve", f"--trainer.callbacks.path={out / 'curve.json'}",
        f"--trainer.callbacks.eval_files={json.dumps(evals)}", f"--trainer.callbacks.every={every}",
        f"--trainer.callbacks.start_cache={out.parent / 'start.json'}", *(options or []),
    ]  # fmt: skip
    print(f"== {out.name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    wall = time.perf_counter() - t0
    history = json.loads((out / "policy" / "history.json").read_text())
    times = [sum(v for k, v in h.items() if k.startswith("time/")) for h in history]
    result = {
        "estimator": estimator, "anchor": anchor, "seed": seed, "precision": precision, "wall_s": wall,
        "s_per_update": sum(times) / max(len(times), 1),
        "optimize_s": sum(h["time/optimize"] for h in history) / max(len(history), 1),
        "forward_s": sum(h["time/forward"] for h in history) / max(len(history), 1),
        "kl_init": history[-1].get("objective/kl_init"), "kl_soup": history[-1].get("objective/kl_soup"),
        "train_score_first": history[0]["objective/scores"], "train_score_last": history[-1]["objective/scores"],
        "curve": json.loads((out / "curve.json").read_text())["points"],
    }  # fmt: skip
    cached.write_text(json.dumps(result))
    return result


def summarise(result: dict, split: str) -> dict:
    """Gold before / after and the paired gain over prompts, with a bootstrap 95% interval."""
    import numpy as np

    from salsa_lightning.evaluation.stats import bootstrap_interval

    first, last = result["curve"][0][split], result["curve"][-1][split]
    gain = np.asarray(last) - np.asarray(first)
    lo, hi = bootstrap_interval(gain, samples=2000, seed=0)
    return {"before": float(np.mean(first)), "after": float(np.mean(last)), "gain": float(gain.mean()), "ci": (lo, hi)}


def anchor_effect(results: list[dict], estimator: str, split: str) -> dict | None:
    """Soup minus init for one estimator: the final held-out gold of the two anchors, paired by seed and prompt (every
    arm starts from the same greedy SFT point, so this is also the difference of their gains). `None` unless both
    anchors ran with a common seed. The interval resamples prompts (of the per-prompt difference averaged over the
    seeds); how much the seeds disagree is in `per_seed`, which that interval does not cover."""
    import numpy as np

    from salsa_lightning.evaluation.stats import bootstrap_interval

    arms = {
        a: {r["seed"]: r for r in results if (r["estimator"], r["anchor"]) == (estimator, a)} for a in ("init", "soup")
    }
    seeds = sorted(arms["init"].keys() & arms["soup"].keys())
    seeds = [s for s in seeds if arms["init"][s]["curve"][-1]["update"] == arms["soup"][s]["curve"][-1]["update"]]
    if not seeds:
        return None
    diffs = np.asarray([np.subtract(arms["soup"][s]["curve"][-1][split], arms["init"][s]["curve"][-1][split])
                        for s in seeds])  # (seeds, prompts)  # fmt: skip
    per_prompt = diffs.mean(axis=0)
    lo, hi = bootstrap_interval(per_prompt, samples=2000, seed=0)
    return {"seeds": seeds, "diff": float(per_prompt.mean()), "ci": (lo, hi), "per_seed": diffs.mean(axis=1).tolist()}


def report(results: list[dict], out: Path) -> str:
    lines = [
        f"machine: {describe_machine()}, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"precision: {', '.join(sorted({r.get('precision', '?') for r in results}))}",
        "",
        "| arm | seed | updates | split | gold before | gold after | gain [95% CI] | KL init | KL soup | s/update | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for split in ("id", "ood"):
            s = summarise(r, split)
            kl = [f"{r[k]:.2f}" if r[k] is not None else "—" for k in ("kl_init", "kl_soup")]
            lines.append(
                f"| {r['estimator']}:{r['anchor']} | {r['seed']} | {r['curve'][-1]['update']} | {split} | {s['before']:.3f} | {s['after']:.3f} | "
                f"{s['gain']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}] | {kl[0]} | {kl[1]} | "
                f"{r['s_per_update']:.1f} | {r['wall_s']:.0f} |"
            )
    by = {(r["estimator"], r["anchor"], r["seed"]): r for r in results}
    for (est, anchor, seed), r in by.items():
        if est == "grpo" and ("gae", anchor, seed) in by:
            g = by[("gae", anchor, seed)]
            lines.append(
                f"\ngrpo vs gae ({anchor}, seed {seed}): update (forward + optimise) "
                f"{(r['forward_s'] + r['optimize_s']) / (g['forward_s'] + g['optimize_s']):.2f}x, whole update "
                f"{r['s_per_update'] / g['s_per_update']:.2f}x (the same rollout rows: gae one per prompt, grpo n per prompt)"
            )
    for est in sorted({r["estimator"] for r in results}):
        for split in ("id", "ood"):
            e = anchor_effect(results, est, split)
            if e is not None:
                lines.append(
                    f"\nsoup - init ({est}, {split}, seeds {' '.join(map(str, e['seeds']))}): final gold "
                    f"{e['diff']:+.3f} [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}] (95%, over prompts); per seed "
                    + ", ".join(f"{d:+.3f}" for d in e["per_seed"])
                )
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    plot(results, out / "curves.png")
    return text


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("id", "ood")):
        for r in results:
            xs = [p["update"] for p in r["curve"]]
            ys = [sum(p[split]) / len(p[split]) for p in r["curve"]]
            ax.plot(xs, ys, marker="o", label=f"{r['estimator']}:{r['anchor']} s{r['seed']}")
        ax.set_title(f"held-out gold ({split}), greedy")
        ax.set_xlabel("update")
    axes[0].set_ylabel("mean gold score")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["gae:init", "gae:soup", "grpo:init", "grpo:soup"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--updates", type=int, default=24, help="rollouts per run")
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learning")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument(
        "--precision", default=None, help="trainer.precision (default: bf16-mixed where fast, else 32-true)"
    )
    ours = ap.add_argument_group("work-saving options (off by default)")
    ours.add_argument("--rollout-logprobs", action="store_true", help="model.ppo.rollout_logprobs=true")
    ours.add_argument("--logprob-check-every", type=int, default=10, help="model.ppo.logprob_check_every (default 10)")
    ours.add_argument("--logged-kl-every", type=int, default=1, help="model.ppo.logged_kl_every (default 1)")
    ours.add_argument("--merge-lora", action="store_true", help="model.generation.merge_lora=true")
    ours.add_argument("--extra", action="append", default=[], metavar="ARG",
                      help="one more CLI argument, e.g. --extra=--model.ppo.ppo_epochs=1 (repeatable)")  # fmt: skip
    ours.add_argument("--tag", default="", help="names the --extra runs' folders (-x<tag>) instead of a hash")
    args = ap.parse_args()
    from salsa_lightning.hardware import training_precision

    precision = args.precision or training_precision()
    ensure_quickstart(args.python, precision)
    results = []
    for arm in args.arms:
        estimator, anchor = arm.split(":")
        for seed in args.seeds:
            out = args.out / f"{estimator}-{anchor}-s{seed}-u{args.updates}{option_suffix(args)}"
            results.append(run_arm(args.python, estimator, anchor, seed, args.updates, args.eval_every, out, precision,
                                   option_args(args)))  # fmt: skip
    print(report(results, args.out))


if __name__ == "__main__":
    main()
