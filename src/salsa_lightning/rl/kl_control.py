"""The KL coefficient β: fixed, or adapted toward a target KL (Ziegler et al. 2019, §2.2).

Adaptive rule (Ziegler et al. 2019, eq. 2, with their ±0.2 clip):

    e = clip(KL / target - 1, -0.2, 0.2)
    β ← β·(1 + e·n_steps / horizon)

`KL` is whatever the caller measures per update and `target` must be in the same unit; Ziegler et al.
and TRL use the mean over the batch of the per-sequence summed k1 (`objective/kl`). `n_steps` is the
number of samples (episodes) in the update. Both controllers keep their state in plain attributes and
round-trip through `state_dict()` / `load_state_dict()`, so a resumed run continues with the β it had.
"""

from __future__ import annotations

import math
from typing import Any

from salsa_lightning.errors import SalsaError
from salsa_lightning.rl.rewards import check_kl_coef


class FixedKLController:
    """β stays at its initial value."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        self.value = check_kl_coef(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns β (same signature as the adaptive controller)."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(self.kind, state)
        self.value = check_kl_coef(state["value"])


class AdaptiveKLController:
    """β moves toward the value that keeps the measured KL at `target` (Ziegler et al. 2019).

    Each update changes β by at most a factor 1 ± 0.2·n_steps/horizon.
    """

    kind = "adaptive"
    max_error = 0.2  # Ziegler et al.'s clip on the proportional error

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        self.value = check_kl_coef(kl_coef)
        if not target > 0:
            raise SalsaError(f"The adaptive KL target must be > 0 (got {target}); set `kl_target` to e.g. 6.0.")
        if not horizon > 0:
            raise SalsaError(f"The adaptive KL horizon must be > 0 (got {horizon}); set `kl_horizon` to e.g. 10000.")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one update for a batch of `n_steps` samples whose measured KL is `current_kl`; returns β.

        A non-finite KL leaves β unchanged: the update it came from is skipped anyway, and one NaN must
        not turn β into NaN for the rest of the run.
        """
        if not math.isfinite(float(current_kl)):
            return self.value
        error = min(max(float(current_kl) / self.target - 1.0, -self.max_error), self.max_error)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore β. `target` and `horizon` are configuration: they stay as constructed from the config."""
        _check_kind(self.kind, state)
        self.value = check_kl_coef(state["value"])


KLController = FixedKLController | AdaptiveKLController


def _check_kind(kind: str, state: dict[str, Any]) -> None:
    if state.get("kind") != kind:
        raise SalsaError(
            f"The checkpoint holds a {state.get('kind')!r} KL controller but the config asks for a {kind!r} one; "
            "resume with the config the run started with."
        )


def make_kl_controller(kl_coef: float, target: float | None = None, horizon: float = 10000) -> KLController:
    """A fixed controller when `target` is None, else an adaptive one (TRL's `adap_kl_ctrl` knobs)."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
