"""What a path on the command line names: a checkpoint, a run directory, or nothing at all.

``show`` (and any command that reads one checkpoint) takes either: a run directory stands for its
newest valid checkpoint, or for its step ``--step N``.  A local path that does not exist is "no such
path" (exit 2), before any command guesses what it was meant to be.
"""

from __future__ import annotations

import os
from typing import Any

import unbroken
from unbroken.storage import is_url

__all__ = ["check_exists", "checkpoint_of", "is_checkpoint", "no_checkpoints"]


def check_exists(path: str) -> None:
    """CheckpointNotFoundError (exit 2) for a local path that is missing or is not a directory."""
    if is_url(path):
        return  # the store says what is missing (a bucket, a run) when it is opened
    if not os.path.lexists(path):
        raise unbroken.CheckpointNotFoundError(f"{os.path.abspath(path)}: no such path")
    if not os.path.isdir(path):
        raise unbroken.CheckpointNotFoundError(f"{os.path.abspath(path)}: not a directory (expected a run "
                                               "directory or a checkpoint directory)")


def is_checkpoint(path: str, options: dict[str, Any] | None) -> bool:
    """Whether ``path`` is one checkpoint; a URL with no parent (``s3://bucket``) can only be a run."""
    try:
        return unbroken.is_checkpoint(path, options)
    except ValueError:  # "a checkpoint URL needs a parent"; any other fault shows when the run is opened
        return False


def no_checkpoints(path: str) -> str:
    """The one message of ``ls`` and ``verify`` for a directory holding no checkpoints (both exit 1)."""
    return f"no checkpoints in {path}"


def checkpoint_of(path: str, step: int | None, options: dict[str, Any] | None) -> str:
    """``path`` itself when it is a checkpoint; for a run directory its checkpoint of ``step``, or
    without ``step`` its newest valid one."""
    check_exists(path)
    if is_checkpoint(path, options):
        if step is not None:
            raise ValueError(f"--step {step}: {path} is one checkpoint, not a run directory; give the run "
                             "directory with --step, or the checkpoint without it")
        return path
    records = [r for r in unbroken.list_checkpoints(path, storage_options=options) if not r.quarantined]
    if not records:
        raise unbroken.CheckpointNotFoundError(f"{path}: neither a checkpoint (no manifest.json) nor a run "
                                               "directory with checkpoints (no step_* directories)")
    if step is not None:
        chosen = [r for r in records if r.step == step]
        if not chosen:
            steps = ", ".join(str(r.step) for r in records)
            raise unbroken.CheckpointNotFoundError(f"{path}: no step {step} (steps there: {steps})")
        return chosen[0].path
    valid = [r for r in records if r.valid]
    if not valid:
        problems = "; ".join(f"step {r.step}: {r.problem}" for r in records)
        raise unbroken.CorruptCheckpointError(f"{path}: no valid checkpoint ({problems})")
    return valid[-1].path
