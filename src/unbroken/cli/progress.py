"""Progress bars for the CLI's long operations (cp, verify, export, import).

A bar is drawn on stderr only when stderr is a terminal (never into a log file or a pipe) and only
for an operation still running after ``DELAY_S`` seconds (tqdm's ``delay``): a short operation
prints nothing, a long one shows that it is alive.  Sizes are counted in the CLI's one unit
convention (decimal, see units.py).  tqdm is imported only when a bar is first advanced, so a
command that never draws one does not pay for it.

    with ProgressBar("step_100", total=nbytes) as bar:
        for chunk in chunks:
            bar.update(len(chunk))

``ProgressBars`` fits the library's ``progress(name, total) -> advance`` callbacks (one bar at a
time, as ``unbroken.copy_checkpoints`` and ``unbroken.verify`` report).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from unbroken.cli.units import UNIT_DIVISOR

__all__ = ["DELAY_S", "ProgressBar", "ProgressBars", "wanted"]

DELAY_S = 2.0
"""Operations shorter than this draw no bar at all (the default ``delay``, read when a bar is made)."""


def wanted(stream: TextIO | None = None, enabled: bool = True) -> bool:
    """Whether to draw bars at all: asked for (no ``--no-progress``) and ``stream`` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return enabled and callable(isatty) and bool(isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


class ProgressBar:
    """One bar of ``total`` bytes labelled ``label``.  Created on the first ``update`` with a positive
    count, so an operation that moves no bytes (a step already present) draws nothing."""

    def __init__(self, label: str, total: int | None, *, enabled: bool = True, stream: TextIO | None = None,
                 delay: float | None = None, unit: str = "B") -> None:
        self._stream = sys.stderr if stream is None else stream
        self._enabled = wanted(self._stream, enabled)
        self._label, self._total, self._unit = label, total, unit
        self._delay = DELAY_S if delay is None else delay
        self._bar: Any = None

    def update(self, n: int) -> None:
        if not self._enabled or n <= 0:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, desc=self._label, unit=self._unit, unit_scale=True,
                             unit_divisor=UNIT_DIVISOR, file=self._stream, leave=False, delay=self._delay,
                             dynamic_ncols=True)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ProgressBars:
    """A sequence of bars, one at a time: ``bars(name, total)`` closes the previous bar and returns
    the new one's ``update`` (the library's progress-callback protocol).  Use as a context manager
    so the last bar is closed however the operation ends."""

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None, delay: float | None = None) -> None:
        self._stream, self._delay = stream, delay
        self._enabled = wanted(stream, enabled)
        self._bar: ProgressBar | None = None

    def __call__(self, label: str, total: int) -> Callable[[int], None] | None:
        self.close()
        if not self._enabled:
            return None
        self._bar = ProgressBar(label, total, stream=self._stream, delay=self._delay)
        return self._bar.update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
