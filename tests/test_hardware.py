"""What the quickstart and the benchmarks read off the machine: native bf16 from the CPU flags, and the line the
benchmarks print about the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from salsa_lightning import hardware


@pytest.fixture()
def cpuinfo(tmp_path, monkeypatch):
    """Points the module's /proc/cpuinfo at a file the test writes."""
    fake = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "Path", lambda p: fake if p == "/proc/cpuinfo" else Path(p))
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    return fake


@pytest.mark.parametrize(
    "flags, fast, shown",
    [
        ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", True, "native bf16 (avx512_bf16, amx_bf16)"),
        ("fpu avx512f avx512_bf16", True, "native bf16 (avx512_bf16)"),
        ("fpu avx2 avx512f", False, "no native bf16 (float32 runs)"),
    ],
)
def test_bf16_is_native_only_with_its_cpu_flags(cpuinfo, flags, fast, shown):
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n")
    assert hardware.fast_bf16() is fast
    assert hardware.training_precision() == ("bf16-mixed" if fast else "32-true")
    assert hardware.generation_dtype() == ("bfloat16" if fast else "float32")
    line = hardware.describe_machine()
    assert line.startswith("Test CPU 9000, ") and line.endswith(shown) and "logical CPUs" in line
