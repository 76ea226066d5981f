"""Where a PPO run's memory goes: resident memory (RSS) phase by phase, for one layout, through the real CLI.

    python benchmarks/ppo_memory_phases.py                      # embedded SmolLM2-135M, LoRA layout
    python benchmarks/ppo_memory_phases.py --layout full --updates 3
    python benchmarks/ppo_memory_phases.py --checkpointing      # with model.gradient_checkpointing
    python benchmarks/ppo_memory_phases.py --precision bf16     # bf16 mixed precision (vs_trl.py --precision bf16)
    python benchmarks/ppo_memory_phases.py --extra=--model.generation.merge_lora=true   # any CLI argument of ours
    MALLOC_ARENA_MAX=1 python benchmarks/ppo_memory_phases.py   # any allocator setting is passed to the run

The settings and models are `benchmarks/vs_trl.py`'s (batch 8, exactly 32 new tokens, one minibatch of 8, fp32 CPU).
A fresh subprocess runs the CLI with probes around each phase — loading the stack, generate, reward scoring, every
forward (policy / each anchor / critic; rollout ones without grad, update ones with), the log-prob math between them,
backward, gradient clipping and the optimiser step. At each probe it reads the process's VmRSS and VmHWM from
/proc/self/status and then resets VmHWM (`/proc/self/clear_refs`, 5), so each row's "peak" is the highest RSS *within*
that interval, and glibc's `mallinfo2` (bytes malloc has handed out and not got back): RSS far above it is memory the
allocator keeps after `free`. The table keeps the rows of the last update (the first ones pay one-off costs) and
the load; `--all` prints every row.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_trl  # noqa: E402

MiB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def status_kib(*keys: str) -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = int(v.split()[0])
    return out


class Probe:
    """Rows of (label, RSS now, peak RSS since the previous probe, malloc's live bytes) in MiB."""

    def __init__(self):
        self.rows: list[dict] = []
        self.update = 0
        self.mark("start")

    def mark(self, label: str) -> None:
        s = status_kib("VmRSS", "VmHWM")
        info = _libc.mallinfo2()
        self.rows.append({"update": self.update, "label": label, "rss": s["VmRSS"] / 1024, "peak": s["VmHWM"] / 1024,
                          "malloc_live": (info.uordblks + info.hblkhd) / MiB, "t": time.perf_counter()})  # fmt: skip
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the next row's peak is that interval's own


PROBE: Probe | None = None


def _wrap(owner, attr: str, label) -> None:
    """Replace `owner.attr` by a version that marks the probe before and after the call."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def probed(*args, **kwargs):
        name = label(*args, **kwargs) if callable(label) else label
        PROBE.mark(f"before {name}")  # closes the interval since the previous probe (the code between phases)
        out = fn(*args, **kwargs)
        PROBE.mark(name)
        return out

    setattr(owner, attr, probed)


def install_probes() -> None:
    import torch

    import salsa_lightning.modules.ppo as ppo_module
    from salsa_lightning.ppo.full_stack import FullStack
    from salsa_lightning.ppo.lora_stack import LoraStack

    def grad_tag() -> str:
        return "update" if torch.is_grad_enabled() else "rollout"

    _wrap(ppo_module, "build_stack", "load the stack")
    for cls in (FullStack, LoraStack):
        _wrap(cls, "generate", "generate")
        _wrap(cls, "reward_scores", "reward score")
        _wrap(cls, "logits", lambda self, name, *a, **k: f"{grad_tag()} forward {name} logits")
        _wrap(cls, "values", lambda *a, **k: f"{grad_tag()} forward values")
    _wrap(ppo_module.PPOModule, "manual_backward", "backward")
    _wrap(ppo_module.PPOModule, "clip_gradients", "clip gradients")
    _wrap(torch.optim.AdamW, "step", "optimizer step")
    orig = ppo_module.PPOModule.training_step

    def training_step(self, *args, **kwargs):
        PROBE.update += 1
        PROBE.mark("before the update")
        out = orig(self, *args, **kwargs)
        PROBE.mark("end of the update (logging)")
        return out

    ppo_module.PPOModule.training_step = training_step


def child(layout: str, paths_file: str, updates: int, out: str) -> None:
    global PROBE
    PROBE = Probe()
    install_probes()
    PROBE.mark("imports")
    from salsa_lightning.cli import cli_main

    paths = json.loads(Path(paths_file).read_text())
    checkpointing = os.environ.get("PHASES_CHECKPOINTING") == "1"
    precision, extra = os.environ.get("PHASES_PRECISION", "fp32"), json.loads(os.environ.get("PHASES_EXTRA", "[]"))
    args = [a for a in vs_trl.ours_args(paths, layout, updates, checkpointing, precision) if "UpdateClock" not in a]
    cli_main([*args, *extra])
    PROBE.mark("fit end")
    # ru_maxrss is VmHWM, which every probe resets: the run's peak is the highest interval's
    peak = max(r["peak"] for r in PROBE.rows)
    Path(out).write_text(json.dumps({"layout": layout, "rows": PROBE.rows, "peak_rss_mib": peak,
                                     "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC")}}))  # fmt: skip


def run_child(layout: str, paths_file: Path, updates: int, extra_env: dict[str, str]) -> dict:
    out = paths_file.parent.parent / f"phases-{layout}-{os.getpid()}.json"
    env = {**os.environ, **extra_env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(vs_trl.ROOT / "src"), str(Path(__file__).parent)])}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", layout, str(paths_file), str(updates), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-4000:])
        raise SystemExit(proc.returncode)
    return json.loads(out.read_text())


def print_rows(result: dict, all_rows: bool) -> None:
    rows, last = result["rows"], max(r["update"] for r in result["rows"])
    print(f"\n{result['layout']} layout, env {result['env'] or '{}'}: peak RSS {result['peak_rss_mib']:.0f} MiB")
    print(f"{'update':>6} {'interval ending at':42} {'peak in it':>10} {'RSS after':>10} {'malloc live':>12}")
    for prev, r in zip(rows, rows[1:]):
        if all_rows or r["update"] in (0, last) or r["label"] == "fit end":
            label = r["label"] if not r["label"].startswith("before ") else f"(code before {r['label'][7:]})"
            if r["label"].startswith("before ") and abs(r["peak"] - prev["rss"]) < 5 and not all_rows:
                continue  # nothing happened between two probes
            print(f"{r['update']:>6} {label:42} {r['peak']:10.0f} {r['rss']:10.0f} {r['malloc_live']:12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="lora", choices=["lora", "full"])
    parser.add_argument("--model", default=vs_trl.EMBEDDED)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="every probe row, every update")
    parser.add_argument("--checkpointing", action="store_true", help="with model.gradient_checkpointing")
    parser.add_argument("--precision", choices=list(vs_trl.PRECISIONS), default="fp32")
    parser.add_argument("--extra", action="append", default=[], metavar="ARG", help="one more CLI argument for ours")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        layout, paths, updates, out = args.child
        return child(layout, paths, int(updates), out)
    config = (
        f"{args.model.replace('embedded:', '').replace('/', '_')}-b{vs_trl.BATCH}-t{vs_trl.NEW_TOKENS}-u{args.updates}"
    )
    root = vs_trl.RESULTS / config / "inputs"
    vs_trl.build_inputs(args.model, root, n_prompts=vs_trl.BATCH * args.updates)
    result = run_child(args.layout, root / "inputs.json", args.updates,
                       {"PHASES_CHECKPOINTING": "1" if args.checkpointing else "0", "PHASES_PRECISION": args.precision,
                        "PHASES_EXTRA": json.dumps(args.extra)})  # fmt: skip
    print_rows(result, args.all)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
