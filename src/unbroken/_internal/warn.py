"""Every warning of the package goes through :func:`warn`: the user sees it once, at their own line.

One channel, chosen by the thread that warns:

* **On the user's thread** (a call the user made: ``step()``, ``restore()``, ``unbroken.load()``,
  a manager's constructor, ...) the warning is issued with :func:`warnings.warn` only, attributed
  to the first frame outside the ``unbroken`` package, i.e. the user's line, however deep the call
  that found the problem.  It is not logged as well: a warning that is also a log record is seen
  twice on a terminal, and the two copies could not be filtered together.  Warnings are the
  channel a user controls per category and per module (``-W error::unbroken.CheckpointSkippedWarning``
  makes a skipped corrupt checkpoint fatal; ``ignore`` silences it), and
  ``logging.captureWarnings(True)`` routes them to the ``py.warnings`` logger for users who keep
  everything in their log files.  Python's default filter shows a given text once per line of
  the user's code; our texts name the step or checkpoint, so each event is shown.
* **On a thread the package started** (the background writer of an async save, the mirror's
  uploader) there is no user line to point at, and a warnings filter set to ``error`` would raise
  inside that thread, where nobody can catch it (a committed save would be reported as failed).
  The message is logged instead, once, at WARNING on the ``unbroken`` logger; with no logging
  configured Python's last-resort handler still prints it on stderr.  Warnings filters do not
  apply to it; logging levels and handlers do.

A frame belongs to the package when its module is ``unbroken`` or ``unbroken.<anything>``: test
modules and user code named otherwise are outside, whatever their file path.
"""

from __future__ import annotations

import logging
import sys
import warnings
from types import FrameType

__all__ = ["warn"]

log = logging.getLogger("unbroken")

# Modules that start threads: when the first frame outside the package is one of these, the
# package's own code is the thread's entry point and no user frame exists on this stack.
_THREAD_STARTERS = ("threading", "concurrent.futures.thread")


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Show ``message`` once: as a ``category`` warning at the user's line, or logged when the
    calling thread has no user frame (see the module docstring)."""
    level = _user_stacklevel(sys._getframe(1))
    if level is None:
        log.warning(message)
        return
    warnings.warn(message, category, stacklevel=level + 1)  # +1: this function's own frame


def _user_stacklevel(frame: FrameType | None) -> int | None:
    """The ``stacklevel`` (counted from ``frame`` = 1) of the first frame outside the package; None
    when there is none, or when it is the thread machinery that started a thread in the package."""
    level = 1
    while frame is not None and _in_package(frame):
        frame, level = frame.f_back, level + 1
    if frame is None or frame.f_globals.get("__name__") in _THREAD_STARTERS:
        return None
    return level


def _in_package(frame: FrameType) -> bool:
    name = frame.f_globals.get("__name__")
    return isinstance(name, str) and (name == "unbroken" or name.startswith("unbroken."))
