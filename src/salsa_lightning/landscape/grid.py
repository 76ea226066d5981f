"""The points of the landscape as pure functions: the α line, the barycentric plane, and their validation.

Every point is a weight vector `w` over ALL seeds (`θ = Σ_i w_i θ_i`, `Σ_i w_i = 1`): the line between seeds 1
and 2 is `w = (1 - α, α[, 0])`, the plane is `(w₁, w₂, w₃)`. One vector per point lets the line, the plane, the
seeds and the soup share one cache and one model shape (the LoRA soup of all seeds has one rank pattern).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from salsa_lightning.errors import SalsaError
from salsa_lightning.landscape.config import LineGrid, PlaneGrid
from salsa_lightning.soup.weights import resolve_weights

# Weights are rounded to this many decimals: -0.5 + 3 * 0.25 and 0.25 must be the same point (and cache entry).
DECIMALS = 10
# The plane's corners in the heat map: seed 1 bottom left, seed 2 bottom right, seed 3 on top.
VERTICES = ((0.0, 0.0), (1.0, 0.0), (0.5, math.sqrt(3) / 2))


@dataclass
class Point:
    """One model of the landscape: its weights over the seeds and where it appears."""

    weights: tuple[float, ...]
    alpha: float | None = None
    """Set when the point is on the line: `weights = (1 - alpha, alpha[, 0])`."""
    on_plane: bool = False
    label: str = ""
    """`seed1`, `seed2`, … for a seed itself, `soup` for the uniform soup, else empty."""


def clean(x: float) -> float:
    """`x` rounded to `DECIMALS` (and -0.0 made 0.0), so that equal points compare and hash equal."""
    return round(float(x), DECIMALS) + 0.0


def point_key(weights: Sequence[float]) -> tuple[float, ...]:
    return tuple(clean(w) for w in weights)


def alpha_grid(start: float, stop: float, num: int) -> list[float]:
    """`num` evenly spaced α from `start` to `stop`, both included (one α: `start`; zero: none)."""
    if num <= 0:
        return []
    if num == 1:
        return [clean(start)]
    return [clean(start + i * (stop - start) / (num - 1)) for i in range(num)]


def line_weights(alpha: float, n: int) -> tuple[float, ...]:
    """`(1 - α, α)` padded with zeros to `n` seeds."""
    return point_key((1.0 - alpha, alpha, *([0.0] * (n - 2))))


def grid_divisions(step: float) -> int | None:
    """`1/step` when it is a whole number (so that the seeds are grid points), else None."""
    if not step > 0:
        return None
    k = round(1.0 / step)
    return k if k >= 1 and abs(k * step - 1.0) <= 1e-9 else None


def barycentric_grid(divisions: int, reach: int = 0) -> list[tuple[float, float, float]]:
    """Every `(k₁, k₂, k₃) / divisions` with integer `k_i >= -reach` and `Σ k_i = divisions`.

    `reach = 0` is the closed triangle: `(d + 1)(d + 2) / 2` points, the seeds at its corners. Each extra unit
    of `reach` adds a ring of points one grid step outside every edge.
    """
    d = divisions
    points = []
    for k1 in range(-reach, d + 2 * reach + 1):
        for k2 in range(-reach, d + 2 * reach + 1):
            k3 = d - k1 - k2
            if k3 >= -reach:
                points.append(point_key((k1 / d, k2 / d, k3 / d)))
    return points  # type: ignore[return-value]


def to_xy(weights: Sequence[float]) -> tuple[float, float]:
    """Cartesian position of barycentric `weights` in the triangle `VERTICES` (for the heat map)."""
    return (sum(w * v[0] for w, v in zip(weights, VERTICES)), sum(w * v[1] for w, v in zip(weights, VERTICES)))


def outside(weights: Sequence[float]) -> bool:
    """True when some weight leaves [0, 1]: the point is beyond the segment/triangle of the seeds."""
    return any(w < 0.0 or w > 1.0 for w in point_key(weights))


def _checked(weights: Sequence[float], what: str) -> tuple[float, ...]:
    try:
        resolve_weights(len(weights), list(weights), allow_extrapolation=True)  # sums to 1, finite
    except SalsaError as err:
        raise SalsaError(f"{what}: {err}") from err
    return point_key(weights)


def landscape_points(n: int, line: LineGrid | None, plane: PlaneGrid | None, extrapolate: bool) -> list[Point]:
    """The validated, de-duplicated points: the line, the plane, every seed and the uniform soup.

    Raises a `SalsaError` naming the offending field for a point whose weights do not sum to 1, a grid that
    would miss the seeds, or an extrapolation (a point beyond the seeds) without `extrapolate`.
    """
    if n not in (2, 3):
        raise SalsaError(f"The landscape takes two seeds (a line) or three (a line and a plane), got {n}; fix `seeds`.")
    points: dict[tuple[float, ...], Point] = {}

    def add(weights: tuple[float, ...]) -> Point:
        return points.setdefault(weights, Point(weights))

    if line is not None:
        alphas = list(dict.fromkeys([*alpha_grid(line.start, line.stop, line.num), *map(clean, line.alphas)]))
        if not alphas:
            raise SalsaError("The line has no points; set `line.num` >= 1, list `line.alphas`, or set `line: null`.")
        for a in alphas:
            if not math.isfinite(a):
                raise SalsaError(f"The line has α={a}; give finite numbers.")
            if not extrapolate and not 0.0 <= a <= 1.0:
                raise SalsaError(
                    f"The line point α={a:g} lies outside [0, 1]: the line beyond [0, 1] (past the seeds) is an "
                    "extrapolation and needs `extrapolate: true`."
                )
            add(line_weights(a, n)).alpha = a
    if plane is not None:
        if n != 3:
            raise SalsaError(
                f"The plane needs three seeds but {n} were given; add a third to `seeds` or set `plane: null`."
            )
        d = grid_divisions(plane.step)
        if d is None:
            raise SalsaError(
                f"plane.step {plane.step:g} does not divide 1 into whole steps, so the seeds would not be grid points; "
                "use e.g. 0.5, 0.25, 0.2 or 0.1."
            )
        if not plane.margin >= 0:
            raise SalsaError(f"plane.margin must be >= 0, got {plane.margin:g}; 0 keeps the grid inside the triangle.")
        if plane.margin > 0 and not extrapolate:
            raise SalsaError(
                f"plane.margin {plane.margin:g} reaches outside the triangle of the seeds (an extrapolation); "
                "set `extrapolate: true` to evaluate it, or `plane.margin: 0`."
            )
        reach = math.floor(plane.margin * d + 1e-9)  # whole grid steps outside each edge
        grid = barycentric_grid(d, reach)
        for i, w in enumerate(plane.points):
            if len(w) != 3:
                raise SalsaError(f"plane.points[{i}] {list(w)} has {len(w)} weights; give three, one per seed.")
            w = _checked(w, f"plane.points[{i}]")
            if outside(w) and not extrapolate:
                raise SalsaError(
                    f"plane.points[{i}] {list(w)} lies outside the triangle of the seeds (a weight outside [0, 1]); "
                    "set `extrapolate: true` to evaluate it."
                )
            grid.append(w)
        for w in grid:
            add(w).on_plane = True
    for i in range(n):
        add(point_key([1.0 if j == i else 0.0 for j in range(n)])).label = f"seed{i + 1}"
    add(point_key([1.0 / n] * n)).label = "soup"
    return list(points.values())
