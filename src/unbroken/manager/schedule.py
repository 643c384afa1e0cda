"""When ``step()`` saves: every N steps and/or every M minutes of wall-clock time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SaveSchedule"]


@dataclass
class SaveSchedule:
    """``every_steps``: save when ``step % every_steps == 0``.  ``every_minutes``: save when this much
    time passed since the last save (or since the schedule started).  Both may be set; neither means
    only explicit ``save()`` calls (and the final save on ``close()``) write checkpoints.
    ``clock``: seconds on a monotonic scale (tests pass a fake one to step through minutes)."""

    every_steps: int | None = None
    every_minutes: float | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    _last_save: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._last_save = self.clock()
        if self.every_steps is not None and (not isinstance(self.every_steps, int)
                                             or isinstance(self.every_steps, bool) or self.every_steps < 1):
            raise ValueError(f"every_steps must be a positive integer or None, got {self.every_steps!r}")
        if self.every_minutes is not None and (isinstance(self.every_minutes, bool)
                                               or not isinstance(self.every_minutes, (int, float))
                                               or not self.every_minutes > 0):
            raise ValueError(f"every_minutes must be a positive number or None, got {self.every_minutes!r}")

    def due(self, step: int) -> bool:
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_minutes is not None and self.clock() - self._last_save >= self.every_minutes * 60

    def saved(self) -> None:
        self._last_save = self.clock()
