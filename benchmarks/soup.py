"""Benchmark: a streaming full-weight soup of three fp32 models the size of the embedded SmolLM2-135M.

    PYTHONPATH=src python benchmarks/soup.py [--workdir DIR] [--repeats 3]

Builds three random Llama checkpoints shaped like SmolLM2-135M (134.5M parameters, tied embeddings,
fp32, 538 MB each) and prints, for `run_soup` on them:
  - its in-process wall time and peak RSS (each run in a fresh subprocess, so setup does not count),
  - the floor: the time to read the three input files plus write one file of the output's size,
  - the ratios against the targets (wall <= 2x floor, peak RSS <= 2x one model's size).
Page cache is warm for both the floor and the soup (each input is read once before timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
CHUNK = 64 << 20


def build_inputs(workdir: Path, n: int = 3) -> list[Path]:
    """`n` random fp32 checkpoints (config.json + model.safetensors) of the SmolLM2-135M shape."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMOLLM2_135M)
    with torch.device("meta"):  # names and shapes only; the values are drawn below, tensor by tensor
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    paths = []
    for seed in range(1, n + 1):
        path = workdir / f"sft-seed{seed}"
        if not (path / "model.safetensors").is_file():
            path.mkdir(parents=True, exist_ok=True)
            gen = torch.Generator().manual_seed(seed)
            sd = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
            save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
            config.save_pretrained(path)
            del sd
        paths.append(path)
    return paths


def read_file(path: Path, buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def floor_seconds(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Read every input file once and write `out_bytes` to one file: the I/O no soup can avoid."""
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    for p in inputs:
        read_file(p / "model.safetensors", buf)
    with open(scratch, "wb", buffering=0) as f:
        left = out_bytes
        view = memoryview(buf)
        while left > 0:
            left -= f.write(view[: min(CHUNK, left)])
    elapsed = time.perf_counter() - t0
    scratch.unlink()
    return elapsed


def _child(inputs: list[str], out: str) -> None:
    """Runs in a fresh interpreter: the soup alone, timed, with its peak RSS."""
    import resource

    import psutil

    from salsa_lightning.soup.api import SoupConfig, run_soup

    cfg = SoupConfig(inputs=inputs, output_dir=out, overwrite=True)
    base_rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    run_soup(cfg, quiet=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"wall_s": wall, "peak_rss": peak, "base_rss": base_rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where the inputs live (kept); default: a temp dir")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is reported")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[:-1], args.child[-1])
        return

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="soup-bench-")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inputs = build_inputs(args.workdir)
    print(f"built inputs in {time.perf_counter() - t0:.1f}s under {args.workdir}")
    model_bytes = (inputs[0] / "model.safetensors").stat().st_size
    n_params = (model_bytes - 8) // 4  # fp32; the header is a few KB
    buf = bytearray(CHUNK)
    for p in inputs:  # warm the page cache so that floor and soup see the same storage state
        read_file(p / "model.safetensors", buf)

    out = args.workdir / "soup"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    runs, floors = [], []
    for _ in range(args.repeats):
        floors.append(floor_seconds(inputs, model_bytes, args.workdir / "floor.bin"))
        res = subprocess.run(
            [sys.executable, __file__, "--child", *map(str, inputs), str(out)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    floor = min(floors)
    wall = min(r["wall_s"] for r in runs)
    peak = min(r["peak_rss"] for r in runs)
    base = min(r["base_rss"] for r in runs)
    mb = 1 << 20
    print(f"model: ~{n_params / 1e6:.1f}M params, {model_bytes / mb:.0f} MiB per fp32 file, 3 inputs")
    floor_runs = ", ".join(f"{f:.2f}" for f in floors)
    print(f"floor (read 3 inputs + write 1 output): {floor:.2f} s   (runs: {floor_runs})")
    walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs)
    print(f"soup wall (in-process run_soup):       {wall:.2f} s   (runs: {walls})")
    print(f"soup peak RSS: {peak / mb:.0f} MiB (of which {base / mb:.0f} MiB before the soup: interpreter + imports)")
    # The machine may be shared: also give the ratio of medians, which one lucky run cannot skew.
    med = statistics.median(r["wall_s"] for r in runs) / statistics.median(floors)
    print(f"wall / floor = {wall / floor:.2f}x best/best, {med:.2f}x median/median   (target <= 2x)")
    print(
        f"peak RSS / model size = {peak / model_bytes:.2f}x   (target <= 2x; without the import baseline: "
        f"{(peak - base) / model_bytes:.2f}x)"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
