"""The stages' AdamW: fused where torch has the kernel for every parameter, the same update as torch's default."""

from __future__ import annotations

import torch

from salsa_lightning.modules.common import OptimSpec, adamw


def _params(seed: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def test_cpu_parameters_get_the_fused_kernel_and_the_default_update():
    spec = OptimSpec(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    ours, ref = _params(0), _params(0)
    opt = adamw(ours, spec)
    default = torch.optim.AdamW(ref, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas, eps=spec.eps)
    assert opt.defaults["fused"] is True and default.defaults["fused"] is None
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        default.step()
    for p, q, start in zip(ours, ref, _params(0)):
        assert not torch.equal(p, start)  # the steps moved the weights
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the optimiser state resumes in torch's default AdamW and back (a checkpoint from either loads in the other)
    default.load_state_dict(opt.state_dict())
    adamw(_params(0), spec).load_state_dict(default.state_dict())


def test_parameters_the_fused_kernel_cannot_take_keep_torchs_default():
    spec = OptimSpec(lr=1e-3)
    assert adamw(_params(0, "meta"), spec).defaults["fused"] is None
    assert adamw([*_params(0), *_params(1, "meta")], spec).defaults["fused"] is None  # one such parameter is enough


def test_lightnings_mixed_precision_and_fsdp_plugins_keep_torchs_default():
    # they refuse gradient clipping with an optimiser that unscales gradients itself, as fused ones do
    from lightning.pytorch.plugins.precision import FSDPPrecision, HalfPrecision, MixedPrecision, Precision

    spec = OptimSpec(lr=1e-3)
    assert adamw(_params(0), spec, Precision()).defaults["fused"] is True  # 32-true
    assert adamw(_params(0), spec, HalfPrecision("bf16-true")).defaults["fused"] is True
    assert adamw(_params(0), spec, MixedPrecision("bf16-mixed", "cpu")).defaults["fused"] is None
    assert adamw(_params(0), spec, FSDPPrecision("32-true")).defaults["fused"] is None
