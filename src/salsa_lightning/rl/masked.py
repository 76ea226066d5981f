"""Reductions over real tokens only: masked sum, mean, variance and whitening.

Conventions shared by every function in `salsa_lightning.rl`:

- `mask` has the shape of `values` (usually `(B, T)`), any dtype; non-zero means "real token".
- Padded positions may hold anything — including NaN or inf (log-probs of padding often are) — and
  never change a result: they are removed with `torch.where`, not by multiplying with the mask,
  because `nan * 0 = nan`. For the same reason their gradient is exactly zero.
- Reductions over no real tokens at all return 0 (not NaN), so that an empty minibatch yields a zero
  loss with a zero gradient instead of poisoning the optimiser state.

The whitening recipe (shift and scale by the statistics of the real tokens, unbiased variance) is the
one used for PPO advantages by Ziegler et al. 2019 and TRL's `masked_whiten`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Dim = int | tuple[int, ...] | None


def _real(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask as a bool tensor broadcast to `like`'s shape."""
    return torch.broadcast_to(mask.bool(), like.shape)


def masked_fill_pad(values: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """`values` with every padded position replaced by `fill` (NaN-safe, gradient 0 at padding)."""
    return torch.where(_real(mask, values), values, torch.as_tensor(fill, dtype=values.dtype, device=values.device))


def masked_count(mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Number of real tokens (int64; the shape of a `masked_sum` over `dim`)."""
    m = mask.bool()
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of `values` over real tokens; over everything when `dim` is None, else along `dim`."""
    v = masked_fill_pad(values, mask)
    return v.sum() if dim is None else v.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of `values` over real tokens (0 where there are none)."""
    count = masked_count(_real(mask, values), dim).to(values.dtype)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over all real tokens (a scalar).

    `unbiased=True` applies Bessel's correction n/(n-1), as TRL does for advantage whitening; with a
    single real token the correction is undefined and the (zero) biased variance is returned instead.
    """
    real = _real(mask, values)
    values = masked_fill_pad(values, real)  # first: a NaN pad would otherwise reach the mean's gradient
    mean = masked_mean(values, real)
    var = masked_mean((values - mean) ** 2, real)
    if unbiased:
        n = masked_count(real).to(values.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)  # n <= 1: keep the biased 0
    return var


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3,) float64 [count, sum, sum of squares] of `values` over real tokens: sums, so that several processes'
    moments add up (all-reduce SUM) to the moments of their concatenated batches. No gradient."""
    real = _real(mask, values)
    v = masked_fill_pad(values.detach(), real).double()
    return torch.stack([real.sum().double(), v.sum(), (v * v).sum()])


def mean_var_from_moments(moments: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from `masked_moments` (possibly summed over processes); Bessel's correction as in
    `masked_var` (none for a single token); 0 and 0 for no tokens."""
    n, total, squares = moments.unbind()
    mean = total / n.clamp(min=1)
    var = (squares / n.clamp(min=1) - mean * mean).clamp(min=0)
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return mean, var


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise `values` to mean 0 and variance 1 over the real tokens; padded positions become 0.

    With `shift_mean=False` only the scale changes: the mean is added back, so the sign of every value
    is kept (TRL uses this for rewards, never for advantages). `eps` keeps a constant input finite.
    `all_reduce`: sums a (3,) tensor of `masked_moments` over processes, so that a batch split across data-
    parallel ranks is whitened with the statistics of the whole batch (then the statistics carry no gradient).
    """
    real = _real(mask, values)
    values = masked_fill_pad(values, real)  # first: a NaN pad would otherwise reach the std's gradient
    if all_reduce is None:
        mean = masked_mean(values, real)
        var = masked_var(values, real, unbiased=unbiased)
    else:
        mean, var = mean_var_from_moments(all_reduce(masked_moments(values, real)), unbiased=unbiased)
        mean, var = mean.to(values.dtype), var.to(values.dtype)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return masked_fill_pad(whitened, real)
