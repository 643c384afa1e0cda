"""What a path on the command line names: a checkpoint, a run directory, or nothing at all.

``show`` (and any command that reads one checkpoint) takes either: a run directory stands for its
newest valid checkpoint, or for its step ``--step N``.  A local path that does not exist is "no such
path" (exit 2), before any command guesses what it was meant to be.  The rules and the messages are
:mod:`unbroken.checkpoint.target`'s, shared with ``export``, ``diff`` and ``read_state_dict``.
"""

from __future__ import annotations

from typing import Any

from unbroken.checkpoint.target import check_exists, find_checkpoint, is_checkpoint

__all__ = ["check_exists", "checkpoint_of", "is_checkpoint", "no_checkpoints"]


def no_checkpoints(path: str) -> str:
    """The one message of ``ls`` and ``verify`` for a directory holding no checkpoints (both exit 1)."""
    return f"no checkpoints in {path}"


def checkpoint_of(path: str, step: int | None, options: dict[str, Any] | None) -> str:
    """``path`` itself when it is a checkpoint; for a run directory its checkpoint of ``step``, or
    without ``step`` its newest valid one (one whose manifest validates; ``ls`` lists the others, so
    no warning is printed for them)."""
    return find_checkpoint(path, step, options, quiet=True).path
