"""Soup weights: the `w_i` of `θ_soup = Σ_i w_i θ_i` (paper eq. 3, generalised to n seeds)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from salsa_lightning.errors import SalsaError

# Weights typed by hand in YAML (0.33, 0.33, 0.34) or computed as 1 - α must pass the sum check.
SUM_TOLERANCE = 1e-6


def resolve_weights(
    n: int,
    weights: Sequence[float] | None = None,
    alpha: float | None = None,
    allow_extrapolation: bool = False,
) -> list[float]:
    """The validated soup weights for `n` inputs.

    Uniform (`1/n` each) when neither `weights` nor `alpha` is given; `alpha` (two inputs only) means
    `(1 - alpha, alpha)`. The weights must always sum to 1 (a soup is an affine combination: a sum other
    than 1 would rescale every weight of the base model, norms included). They must also lie in [0, 1]
    unless `allow_extrapolation` is set — the reward-landscape analysis (paper Fig. 2) needs points
    outside the segment/triangle of the seeds, and nobody should get one by a typo.
    """
    if n < 1:
        raise SalsaError("The soup got no inputs; list at least one SFT output directory under `inputs`.")
    if weights is not None and alpha is not None:
        raise SalsaError("Both `weights` and `alpha` are set; give only one of them.")
    if alpha is not None:
        if n != 2:
            raise SalsaError(f"`alpha` needs exactly two inputs but {n} were given; use `weights` for {n} inputs.")
        weights = [1.0 - float(alpha), float(alpha)]
    elif weights is None:
        weights = [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise SalsaError(
            f"{len(weights)} weights were given for {n} inputs; give one weight per input (or none for uniform)."
        )
    if not all(math.isfinite(w) for w in weights):
        raise SalsaError(f"The weights {weights} contain a NaN or infinity; give finite numbers.")
    total = math.fsum(weights)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise SalsaError(f"The weights {weights} sum to {total:.6g}, not 1; rescale them so that they sum to 1.")
    if not allow_extrapolation and any(w < 0.0 or w > 1.0 for w in weights):
        raise SalsaError(
            f"The weights {weights} leave [0, 1] (an extrapolation); "
            "set `allow_extrapolation: true` if that is intended, otherwise use weights in [0, 1]."
        )
    return weights
