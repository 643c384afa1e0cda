"""The byte-level storage interface: the only thing the layers above know about where bytes go.

A checkpoint is a named set of files.  Writing happens inside a :class:`Staging` area that becomes a
committed checkpoint in one step, :meth:`Staging.commit`, which writes the manifest last: every other
file is durable before the manifest exists, so a present, valid manifest means a complete checkpoint.
"""

from __future__ import annotations

import calendar
import re
import time
import uuid
from abc import ABC, abstractmethod
from typing import ClassVar

__all__ = ["Storage", "Staging", "WriteHandle", "ReadHandle", "STEP_NAME", "MANIFEST_FILE", "QUARANTINE_PREFIX",
           "step_name", "parse_step_name", "quarantine_name", "parse_quarantine_name"]

STEP_NAME = re.compile(r"^step_([0-9]{9,})\Z")  # ASCII digits only; \Z: $ also matches before a final "\n"
# The file whose presence commits a checkpoint (the format layer names it too: format.MANIFEST_NAME).
MANIFEST_FILE = "manifest.json"
# A checkpoint found corrupt is moved to "corrupt-<its name>-<UTC time>-<id>": outside the step_*
# namespace, so nothing counts or restores it, and its step name is free for a new save.
QUARANTINE_PREFIX = "corrupt-"
_QUARANTINE_STAMP = "%Y%m%dT%H%M%SZ"  # UTC, sortable, no characters an object store or a shell minds
_QUARANTINE_NAME = re.compile(r"corrupt-step_([0-9]{9,})-([0-9]{8}T[0-9]{6}Z)-[0-9a-f]{6}")


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def quarantine_name(name: str, now: float) -> str:
    """A fresh quarantine name for checkpoint ``name`` at time ``now`` (unique even within one second)."""
    stamp = time.strftime(_QUARANTINE_STAMP, time.gmtime(now))
    return f"{QUARANTINE_PREFIX}{name}-{stamp}-{uuid.uuid4().hex[:6]}"


def parse_quarantine_name(name: str) -> tuple[int, float] | None:
    """(step, UNIX time of the quarantine) of a name made by :func:`quarantine_name`, else None."""
    match = _QUARANTINE_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        when = calendar.timegm(time.strptime(match.group(2), _QUARANTINE_STAMP))
    except ValueError:
        return None
    return int(match.group(1)), float(when)


def parse_step_name(name: str) -> int | None:
    match = STEP_NAME.match(name)
    return int(match.group(1)) if match else None


class WriteHandle(ABC):
    """A file being written; the bytes are durable once :meth:`close` returns."""

    @abstractmethod
    def write(self, data: memoryview) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class ReadHandle(ABC):
    """An open, regular file of a checkpoint."""

    size: int

    @abstractmethod
    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``; a short read raises ``CorruptCheckpointError``."""

    @abstractmethod
    def close(self) -> None: ...

    def map(self) -> memoryview | None:
        """The whole file mapped into memory (page cache, no copy), or None where not supported."""
        return None

    def __enter__(self) -> ReadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Staging(ABC):
    """A checkpoint in progress; invisible to readers until :meth:`commit`.

    ``token`` names the area so that other processes can write into it (:meth:`Storage.join`): a
    save by several ranks has one area, begun and committed by one coordinator.
    """

    name: str
    token: str = ""

    @abstractmethod
    def create(self, file_name: str) -> WriteHandle: ...

    @abstractmethod
    def commit(self, manifest: bytes) -> None:
        """Write the manifest last and publish the checkpoint atomically and durably."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written; never touches committed checkpoints."""


class Storage(ABC):
    """A run directory: committed checkpoints plus staging and trash areas."""

    url: str
    #: Whether :meth:`join` works: several processes (the ranks of one job) can write files into one
    #: staging area.  A capability of the class, so callers never probe by calling or comparing methods.
    shares_staging: ClassVar[bool] = False

    @abstractmethod
    def names(self) -> list[str]:
        """Names of checkpoint directories, staging and trash areas excluded (committed or not)."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``name`` is taken by a checkpoint, so that no new checkpoint may be committed under it.

        The same question on every storage, answered from what commits a checkpoint there.  Locally a
        checkpoint appears under its name only by the atomic rename of its commit, so any directory
        entry called ``name`` counts (a committed checkpoint, or something foreign the rename must not
        replace).  On object storage the manifest object is the commit, so data objects without it
        (an unfinished save) do not count.  Nothing is read or validated: a corrupt checkpoint exists.
        """

    @abstractmethod
    def begin(self, name: str) -> Staging: ...

    def join(self, name: str, token: str) -> Staging:
        """The staging area another process began for ``name`` (its ``token``), to write files into.

        The joined area is committed by the process that began it, never by the joiner; the
        joiner's :meth:`Staging.abort` removes only the files it created.
        """
        raise NotImplementedError(f"{type(self).__name__} ({getattr(self, 'url', '?')}) cannot share a staging "
                                  "area between processes: saves by several ranks need a shared local filesystem")

    @abstractmethod
    def open(self, name: str, file_name: str) -> ReadHandle: ...

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete a checkpoint so that no half-deleted state ever looks committed."""

    @abstractmethod
    def cleanup(self) -> list[str]:
        """Remove abandoned staging and trash areas; the names removed."""

    def quarantine(self, name: str, new_name: str) -> None:
        """Move checkpoint ``name`` out of the checkpoint namespace to ``new_name`` (a quarantine name),
        so that it is never listed, restored or counted again and its step can be saved anew, while its
        bytes stay for inspection.  Raises ``OSError`` when it cannot be moved (it then stays as it was)."""
        raise NotImplementedError(f"{type(self).__name__} cannot quarantine checkpoints")
