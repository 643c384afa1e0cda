"""When ``step()`` saves: every N steps, every N steps with N tuned to a cost budget, and/or every M minutes.

``every_steps="auto"`` is CheckFreq's adaptive rate tuning (Mohan et al., FAST'21): the interval is the
smallest N with ``save_cost / (N * step_time) <= max_overhead``, where ``save_cost`` is what a save costs
the training thread (the stall inside ``step()``/``save()`` of an async save, the whole save of a
synchronous one) and ``step_time`` is the training time of one step, both measured and smoothed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["AUTO", "DEFAULT_MAX_OVERHEAD", "AutoInterval", "SaveSchedule"]

AUTO = "auto"
DEFAULT_MAX_OVERHEAD = 0.01


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class AutoInterval:
    """The tuned interval of ``every_steps="auto"``: ``interval`` is the current N.

    ``first``: N until a save cost and a step time are known (the first save measures the cost; it
    also fails early if the state cannot be saved).  ``min_steps``/``max_steps``: N stays between them
    (the upper bound keeps a glitch, such as a step time near zero, from stopping saves for good; pass
    ``every_minutes`` for a bound in time).  The cost is smoothed by an exponential average giving
    ``weight`` to the newest save; the step time is the median of the last ``window`` steps, so a slow
    first step (compilation, warm-up) or an evaluation pause does not make saves more frequent.
    """

    max_overhead: float = DEFAULT_MAX_OVERHEAD
    first: int = 100
    min_steps: int = 1
    max_steps: int = 100_000
    weight: float = 0.5
    window: int = 64
    interval: int = field(init=False)
    cost: float | None = field(init=False, default=None)
    _steps: deque[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_overhead, bool) or not isinstance(self.max_overhead, (int, float)) or not (
                0 < self.max_overhead < 1):  # NaN fails too
            raise ValueError(f"max_overhead must be a share of training time between 0 and 1 (exclusive), "
                             f"e.g. 0.01 for 1%, got {self.max_overhead!r}")
        if not all(map(_positive_int, (self.first, self.min_steps, self.max_steps, self.window))) or not (
                self.min_steps <= self.first <= self.max_steps):
            raise ValueError(f"the auto interval needs integers 1 <= min_steps <= first <= max_steps and window >= 1, "
                             f"got min_steps={self.min_steps!r}, first={self.first!r}, max_steps={self.max_steps!r}, "
                             f"window={self.window!r}")
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {self.weight!r}")
        self.interval = self.first
        self._steps = deque(maxlen=self.window)

    @property
    def step_time(self) -> float | None:
        """Seconds of training per step (median of the recent steps), None before the first."""
        return statistics.median(self._steps) if self._steps else None

    def step_took(self, seconds: float) -> None:
        """One step's training time (saves excluded)."""
        if seconds > 0:
            self._steps.append(seconds)

    def save_took(self, seconds: float) -> None:
        """What one save cost the training thread."""
        seconds = max(seconds, 0.0)
        self.cost = seconds if self.cost is None else self.weight * seconds + (1 - self.weight) * self.cost

    def wanted(self) -> int:
        """The N the measurements ask for: smallest with ``cost / (N * step_time) <= max_overhead``."""
        step_time = self.step_time
        if self.cost is None or step_time is None:
            return self.interval
        # The tolerance keeps a quotient such as 20.000000000000004 from asking for 21.
        steps = math.ceil(self.cost / (self.max_overhead * step_time) - 1e-9)
        return min(max(steps, self.min_steps), self.max_steps)


@dataclass
class SaveSchedule:
    """``every_steps``: save when ``step % every_steps == 0``; ``"auto"``: when ``interval`` steps passed
    since the last save, ``interval`` being tuned by :class:`AutoInterval` to keep saves under
    ``max_overhead`` (default 0.01) of the training time.  ``every_minutes``: save when this much
    time passed since the last save (or since the schedule started).  Rules combine; none means
    only explicit ``save()`` calls (and the final save on ``close()``) write checkpoints.
    ``clock``: seconds on a monotonic scale (tests pass a fake one to step through minutes).

    The owner reports every save with :meth:`saved` and, under ``"auto"``, its cost with
    :meth:`save_cost`; :meth:`due` is asked at every step and measures the step time."""

    every_steps: int | str | None = None
    every_minutes: float | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    max_overhead: float | None = None
    auto: AutoInterval | None = field(init=False, default=None, repr=False, compare=False)
    _last_save: float = field(init=False, repr=False)
    _last_save_step: int | None = field(init=False, default=None, repr=False)
    _previous: tuple[int, float] | None = field(init=False, default=None, repr=False)
    _cost_since: float = field(init=False, default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._last_save = self.clock()
        if self.every_steps is not None and self.every_steps != AUTO and not _positive_int(self.every_steps):
            raise ValueError(f"every_steps must be a positive integer, 'auto' or None, got {self.every_steps!r}")
        if self.every_minutes is not None and (isinstance(self.every_minutes, bool)
                                               or not isinstance(self.every_minutes, (int, float))
                                               or not self.every_minutes > 0):
            raise ValueError(f"every_minutes must be a positive number or None, got {self.every_minutes!r}")
        if self.max_overhead is not None and self.every_steps != AUTO:
            keep = (f"keep saving every {self.every_steps} steps" if self.every_steps is not None
                    else "save only on every_minutes, save() and close()")
            raise ValueError(f"max_overhead={self.max_overhead!r} tunes every_steps='auto', but every_steps="
                             f"{self.every_steps!r}; pass every_steps='auto' with it, or drop max_overhead to {keep}")
        if self.every_steps == AUTO:
            self.auto = AutoInterval(DEFAULT_MAX_OVERHEAD if self.max_overhead is None else self.max_overhead)

    @property
    def interval(self) -> int | None:
        """Steps between step-based saves now (the tuned N under ``"auto"``), None without that rule."""
        if self.auto is not None:
            return self.auto.interval
        return self.every_steps if isinstance(self.every_steps, int) else None

    def due(self, step: int) -> bool:
        if self.auto is not None:
            self._measure(step)
            if self._last_save_step is None:  # counting starts before the first step reported
                self._last_save_step = step - 1
            if step - self._last_save_step >= self.auto.interval:
                return True
        elif isinstance(self.every_steps, int) and step % self.every_steps == 0:
            return True
        return self.every_minutes is not None and self.clock() - self._last_save >= self.every_minutes * 60

    def _measure(self, step: int) -> None:
        """The training time per step since the previous ``due``, less the saves in between."""
        now = self.clock()
        if self.auto is not None and self._previous is not None and step > self._previous[0]:
            before, then = self._previous
            self.auto.step_took((now - then - self._cost_since) / (step - before))
        if self._previous is None or step > self._previous[0]:
            self._previous, self._cost_since = (step, now), 0.0

    def saved(self, step: int | None = None) -> None:
        """A save of ``step`` (default: the last step asked about) started, or a restore resumed at it."""
        self._last_save = self.clock()
        if step is not None:
            self._last_save_step = step
        elif self._previous is not None:
            self._last_save_step = self._previous[0]

    def save_cost(self, seconds: float) -> None:
        """What the last save cost the training thread; under ``"auto"`` the interval is tuned again."""
        self._cost_since += seconds
        if self.auto is not None:
            self.auto.save_took(seconds)
            self.auto.interval = self._agree(self.auto.wanted())

    def _agree(self, interval: int) -> int:
        """The interval every process uses (one process: its own)."""
        return interval
