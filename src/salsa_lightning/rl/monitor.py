"""KL-hack detection (SALSA paper, Appendix A.4): the pure part, no Lightning.

With a large β the policy can drive the KL penalty to zero by shortening its responses toward zero
length (an empty response has zero KL to any anchor). The symptom is the mean response length falling
far below its value at the start of training. A Lightning callback wraps `KLHackMonitor` and warns or
stops as configured.
"""

from __future__ import annotations

import math
from typing import Any

from salsa_lightning.errors import SalsaError


def kl_hack_detected(reference_length: float, current_length: float, min_fraction: float) -> bool:
    """True when `current_length < min_fraction · reference_length` (mean response lengths, in tokens)."""
    return current_length < min_fraction * reference_length


class KLHackMonitor:
    """Tracks mean response length per update and flags the KL hack.

    The reference length is the mean of the first `reference_updates` observations (one update's mean
    length is noisy). After that, `update` returns True once the length has stayed below
    `min_fraction` of the reference for `patience` consecutive updates. State round-trips through
    `state_dict()` / `load_state_dict()` so a resumed run keeps its reference.
    """

    def __init__(self, min_fraction: float = 0.25, reference_updates: int = 1, patience: int = 1) -> None:
        if not 0 < min_fraction < 1:
            raise SalsaError(
                f"The KL-hack length fraction must be in (0, 1) (got {min_fraction}); set `model.kl_hack.min_fraction` to e.g. 0.25."
            )
        if reference_updates < 1 or patience < 1:
            raise SalsaError(
                f"The KL-hack monitor's reference_updates and patience must be >= 1 (got {reference_updates} and {patience}); set `model.kl_hack.patience` to 1 or more."
            )
        self.min_fraction = float(min_fraction)
        self.reference_updates = int(reference_updates)
        self.patience = int(patience)
        self.reference_length: float | None = None
        self._reference_sum = 0.0
        self._reference_count = 0
        self.below_count = 0

    def update(self, mean_length: float) -> bool:
        """Record one update's mean response length; True when the KL hack is detected.

        Non-finite lengths are ignored (they come from skipped updates).
        """
        mean_length = float(mean_length)
        if not math.isfinite(mean_length):
            return False
        if self.reference_length is None:
            self._reference_sum += mean_length
            self._reference_count += 1
            if self._reference_count == self.reference_updates:
                self.reference_length = self._reference_sum / self._reference_count
            return False
        if kl_hack_detected(self.reference_length, mean_length, self.min_fraction):
            self.below_count += 1
        else:
            self.below_count = 0
        return self.below_count >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "reference_length": self.reference_length,
            "reference_sum": self._reference_sum,
            "reference_count": self._reference_count,
            "below_count": self.below_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference_length = state["reference_length"]
        self._reference_sum = float(state["reference_sum"])
        self._reference_count = int(state["reference_count"])
        self.below_count = int(state["below_count"])
