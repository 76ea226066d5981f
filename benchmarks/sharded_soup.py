"""Benchmark: per-rank memory of building a two-seed soup under FSDP2, whole vs shard by shard.

    PYTHONPATH=src python benchmarks/sharded_soup.py [--nproc 2] [--workdir DIR]

Two fp32 "seeds" shaped like SmolLM2-135M (random weights, 538 MB each) are souped with weights (0.5, 0.5) on
`nproc` CPU processes (gloo), each method in a fresh torchrun so that peak RSS is its own:
  - whole: what a rank does without `soup.sharded` — load both seeds whole (`from_pretrained`), average the state
    dicts (`soup_state_dicts`), then `fully_shard` the result;
  - sharded: `soup.sharded.load_sharded` — meta-device model, sharded, each rank reads only its rows of each seed.
Prints each rank's peak RSS above its RSS after imports, the model size, and checks that both give the same soup.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, seeds: list[str], out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from salsa_lightning.distributed import FSDPSpec, full_state_dict, shard_decoder_layers
    from salsa_lightning.models.loading import ModelSpec
    from salsa_lightning.soup.api import soup_state_dicts
    from salsa_lightning.soup.sharded import load_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    base = rss_mib()
    if mode == "whole":
        models = [AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32) for s in seeds]
        models[0].load_state_dict(soup_state_dicts([m.state_dict() for m in models], [0.5, 0.5]))
        model = shard_decoder_layers(models[0], mesh, FSDPSpec())
        del models
    else:
        model = load_sharded(AutoModelForCausalLM, seeds, [0.5, 0.5], ModelSpec(dtype="float32"), mesh, FSDPSpec())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    state = full_state_dict(model)  # a check only (gathered after the peak was read)
    rank = dist.get_rank()
    if rank == 0:
        torch.save({k: v.clone() for k, v in list(state.items())[:4]}, f"{out}.{mode}.pt")
    Path(f"{out}.{mode}.rank{rank}.json").write_text(json.dumps({"peak_above_imports_mib": peak}))
    dist.destroy_process_group()


def make_seeds(workdir: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from soup import SMOLLM2_135M

    paths = []
    for i in range(2):
        path = workdir / f"seed{i}"
        if not (path / "model.safetensors").exists():
            torch.manual_seed(i)
            AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=torch.float32).save_pretrained(path)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "SEEDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, seeds, out = args.worker
        return worker(mode, seeds.split(","), out)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        seeds = make_seeds(workdir)
        size_mib = os.path.getsize(Path(seeds[0]) / "model.safetensors") / 2**20
        out = str(workdir / "result")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        results = {}
        for mode in ("whole", "sharded"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, "--worker", mode, ",".join(seeds), out]  # fmt: skip
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            results[mode] = [
                json.loads(Path(f"{out}.{mode}.rank{r}.json").read_text())["peak_above_imports_mib"]
                for r in range(args.nproc)
            ]
        a, b = torch.load(f"{out}.whole.pt", weights_only=True), torch.load(f"{out}.sharded.pt", weights_only=True)
        same = all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    print(f"one seed: {size_mib:.0f} MiB (fp32); {args.nproc} processes; soup of 2 seeds")
    for mode, peaks in results.items():
        shown = ", ".join(f"{p:.0f}" for p in peaks)
        print(f"  {mode:8s} peak RSS above imports per rank: [{shown}] MiB = {max(peaks) / size_mib:.2f}x one seed")
    print(f"  same soup (first tensors compared): {same}")


if __name__ == "__main__":
    main()
