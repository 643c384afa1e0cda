"""Named points on the save path where a crash or an I/O error can be injected, for fault testing.

Every durable step of a save (creating a file, each write, each fsync, the manifest, the renames,
retention deletes) passes a named point.  The points cost one global check when unset.  They are
armed only from the environment of a process, so tests and ``bench/kill_sweep.py`` inject faults
into a real training subprocess without patching anything:

``UNBROKEN_FAILPOINT="<name>:<n>:<action>"``
    At the ``n``-th time (1-based) this process passes point ``<name>`` (``*``: any point), do
    ``<action>``: ``kill`` (SIGKILL itself: a crash or power cut at exactly that point), ``enospc``
    or ``eio`` (the call fails with that ``OSError``, as a full or failing disk would make it).
``UNBROKEN_FAILPOINT_TRACE=<file>``
    Append the name of every point passed, one per line (to enumerate a save's points).

In-process tests of I/O errors use :func:`arm` instead (no subprocess needed for an ``OSError``).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass

__all__ = ["POINTS", "OBJECT_POINTS", "ACTIONS", "hit", "arm", "FailpointSpec", "parse_spec"]

ENV_SPEC = "UNBROKEN_FAILPOINT"
ENV_TRACE = "UNBROKEN_FAILPOINT_TRACE"

POINTS = (
    "staging.create",     # the staging directory was created (and its parent fsynced)
    "file.create",        # a data file is about to be created in the staging directory
    "file.write",         # an os.write of file bytes is about to happen
    "file.fsync",         # a completed file is about to be fsynced
    "manifest.write",     # the manifest is about to be written to its temporary name
    "manifest.rename",    # the fsynced manifest is about to be renamed to manifest.json
    "commit.rename",      # the staging directory is about to be renamed to its final name
    "commit.fsync",       # the run directory is about to be fsynced after the commit rename
    "delete.rename",      # retention: a checkpoint is about to be renamed to the trash
    "delete.remove",      # retention: a trashed checkpoint is about to be removed
)
# Points of uploads to object storage (FsspecStorage).  Kept apart from POINTS, which lists the phases
# of a local save (tests/manager/test_kill_sweep.py requires a local save to pass every one of them).
OBJECT_POINTS = (
    "object.part",        # bytes of a data object were just handed to its multipart upload (a part sent)
    "object.put",         # a data object is about to be uploaded whole, or its multipart upload completed
)
ACTIONS = ("kill", "enospc", "eio")
_ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO}


@dataclass(frozen=True)
class FailpointSpec:
    point: str
    count: int
    action: str


def parse_spec(text: str) -> FailpointSpec:
    """Parse ``name:n:action``; a ValueError saying what is wrong and what is accepted."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise ValueError(f"{ENV_SPEC}={text!r}: expected '<point>:<n>:<action>', e.g. 'file.fsync:1:eio'")
    point, count, action = parts
    if point != "*" and point not in POINTS + OBJECT_POINTS:
        raise ValueError(f"{ENV_SPEC}={text!r}: unknown point {point!r}; use '*' or one of "
                         f"{', '.join(POINTS + OBJECT_POINTS)}")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV_SPEC}={text!r}: the count must be a positive integer, got {count!r}")
    if action not in ACTIONS:
        raise ValueError(f"{ENV_SPEC}={text!r}: unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    return FailpointSpec(point, int(count), action)


class _Armed:
    def __init__(self, spec: FailpointSpec | None, trace: str | None) -> None:
        self.spec, self.trace = spec, trace
        self.seen = 0
        self.lock = threading.Lock()  # the async writer thread and the training thread both pass points

    def hit(self, point: str) -> None:
        with self.lock:
            if self.trace:
                with open(self.trace, "a", encoding="utf-8") as out:
                    out.write(point + "\n")
            spec = self.spec
            if spec is None or spec.point not in ("*", point):
                return
            self.seen += 1
            if self.seen != spec.count:
                return
        if spec.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        code = _ERRNO[spec.action]
        raise OSError(code, f"{os.strerror(code)} (injected by {ENV_SPEC} at {point})")


def _from_environment() -> _Armed | None:
    spec_text, trace = os.environ.get(ENV_SPEC), os.environ.get(ENV_TRACE)
    if not spec_text and not trace:
        return None
    return _Armed(parse_spec(spec_text) if spec_text else None, trace or None)


_ARMED = _from_environment()


def arm(spec: str | None, trace: str | None = None) -> None:
    """Arm (or with ``None``, disarm) a fault in this process, replacing the environment's; counts restart."""
    global _ARMED
    _ARMED = _Armed(parse_spec(spec) if spec else None, trace) if spec or trace else None


def hit(point: str) -> None:
    """Pass the named point: a no-op unless a fault is armed for it in this process's environment."""
    if _ARMED is not None:
        _ARMED.hit(point)
