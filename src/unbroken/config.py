"""The manager's settings, documented and validated in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .retention import KeepBest, KeepEvery, KeepLast, RetentionPolicy
from .schedule import SaveSchedule

__all__ = ["ManagerConfig"]


@dataclass(frozen=True)
class ManagerConfig:
    every_steps: int | None = None
    """``step(n)`` saves when ``n % every_steps == 0``."""
    every_minutes: float | None = None
    """``step(n)`` saves when this many minutes passed since the last save."""
    keep_last: int | None = None
    """Keep the N newest checkpoints (None: no limit from this policy)."""
    keep_best: int | None = None
    """Keep the N checkpoints with the best ``best_metric``."""
    best_metric: str | None = None
    """Name of the metric (passed to ``step(..., metrics=)``) that ranks checkpoints for ``keep_best``."""
    best_mode: str = "min"
    """"min" (a loss) or "max" (an accuracy)."""
    keep_every: int | None = None
    """Keep milestones: checkpoints whose step is a multiple of this."""
    save_on_close: bool = True
    """``close()`` saves the last step seen if it has no checkpoint yet (not after an exception)."""
    strict: bool = True
    """``restore()`` refuses checkpoints that do not match the live objects; False loads what matches."""
    capture_rng: bool = True
    """Save and restore Python, NumPy, torch CPU and CUDA random streams automatically."""
    metadata: Any = None
    """JSON-able user metadata (args, config) stored in every manifest."""

    def __post_init__(self) -> None:
        self.schedule()  # validates every_steps / every_minutes
        self.policies()  # validates the retention settings
        if self.best_metric is not None and self.keep_best is None:
            raise ValueError(f"best_metric={self.best_metric!r} is set but keep_best is not; set keep_best=N")
        for name in ("save_on_close", "strict", "capture_rng"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def schedule(self) -> SaveSchedule:
        return SaveSchedule(self.every_steps, self.every_minutes)

    def policies(self) -> list[RetentionPolicy]:
        policies: list[RetentionPolicy] = []
        if self.keep_last is not None:
            policies.append(KeepLast(self.keep_last))
        if self.keep_best is not None:
            policies.append(KeepBest(self.keep_best, self.best_metric or "", self.best_mode))
        if self.keep_every is not None:
            policies.append(KeepEvery(self.keep_every))
        return policies
