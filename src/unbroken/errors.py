"""The errors unbroken raises.

Each class derives from the builtin exception a caller would naturally catch (``ValueError`` for bad
data, ``OSError`` for storage, ...) and from :class:`UnbrokenError`, so ``except UnbrokenError``
catches everything of ours.  Messages name the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "UnbrokenError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
    "PartialRestoreError",
    "UnserializableStateError",
    "StateMismatchError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "StorageError",
    "RunDirectoryReplacedError",
    "RunLockedError",
    "DistributedError",
    "CheckpointSkippedWarning",
    "is_damage",
]


class UnbrokenError(Exception):
    """Base class of every error raised by unbroken."""


class CorruptCheckpointError(UnbrokenError, ValueError):
    """A checkpoint on disk is truncated, bit-flipped, half-written or crafted."""


class PartialRestoreError(CorruptCheckpointError):
    """Loading failed after some live objects were already overwritten; they must not be trained on."""


class UnsupportedFormatError(CorruptCheckpointError):
    """The checkpoint was written by an incompatible (newer major) format version."""


class UnserializableStateError(UnbrokenError, TypeError):
    """A state value is neither a tensor nor a JSON-able value we can encode exactly."""


class StateMismatchError(UnbrokenError, ValueError):
    """The checkpoint does not fit the live objects (missing/unexpected keys, shapes, dtypes)."""


class CheckpointNotFoundError(UnbrokenError, FileNotFoundError):
    """The requested checkpoint or run directory does not exist."""


class CheckpointExistsError(UnbrokenError, FileExistsError):
    """A committed checkpoint for this step already exists and is never overwritten."""


class StorageError(UnbrokenError, OSError):
    """Writing, committing or deleting a checkpoint failed at the storage level."""


class RunDirectoryReplacedError(StorageError):
    """The run directory was deleted or replaced (``rm -rf run``, a new job's directory at the same
    path) after this process opened it; nothing more is written into it or deleted from it.

    Not a passing I/O failure: no later save of this process can succeed, and the path may belong to
    another job now, whose checkpoints this one must never touch.  So it stops the training even with
    ``on_save_error="warn"``, which exists to ride out a full or flaky disk: a run that can no longer
    save anywhere safe must not go on unprotected, warning at every save.  The fix is a restart, which
    locks the directory as it is now and resumes from it."""


class RunLockedError(UnbrokenError, RuntimeError):
    """Another live process holds the run directory: two writers must never share one run."""


class DistributedError(UnbrokenError, RuntimeError):
    """Under torch.distributed: another rank failed, died or timed out during a collective save or
    restore step (the message names the rank), or the ranks' states do not fit together."""


class CheckpointSkippedWarning(UserWarning):
    """A checkpoint was found invalid and skipped; an older valid one is used instead."""


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc`` says the checkpoint itself is damaged (what restore quarantines).  Not a newer
    format (a newer release reads it), and not a live object refusing data that verified
    (PartialRestoreError: every checksum matched before it was loaded; the training code may be what
    changed)."""
    return isinstance(exc, CorruptCheckpointError) and not isinstance(exc, (UnsupportedFormatError,
                                                                             PartialRestoreError))
