"""The checkpoint a user means by a path: a checkpoint directory, or a run directory standing for its
newest valid checkpoint or for its step ``N``; local or a URL.

The one definition behind every reader of one checkpoint (``read_state_dict``, ``export``, ``diff``,
``unbroken show``), so that each says the same of the same mistake:

* ``PATH: no such path`` (a local path that does not exist), ``PATH: not a directory (...)``
* ``PATH: neither a checkpoint (no manifest.json) nor a run directory with checkpoints (...)``
* ``PATH: no step 7 (steps there: 1, 2, 3)``
* ``PATH is the checkpoint of step 20, not of step 10; ...``
* ``PATH: no valid checkpoint (step 3: ...; step 2: ...)``

A named step (or a checkpoint directory) never falls back to another checkpoint.  Without a step, a
run's newest checkpoint found damaged, while its manifest is read or inside the caller's ``use``, is
skipped for the one before, with a :class:`CheckpointSkippedWarning` unless ``quiet``.  Only damage
falls back: an I/O error, or a checkpoint of a newer format, raises (nothing is decided on a guess).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .._internal.warn import warn
from ..errors import CheckpointNotFoundError, CheckpointSkippedWarning, CorruptCheckpointError, is_damage
from ..format import Manifest
from ..io import read_manifest
from ..storage import Storage, is_url, step_name
from ..storage.paths import committed_steps, is_checkpoint_dir, open_run, split_checkpoint_path
from .listing import check_named_step

__all__ = ["Target", "find_checkpoint", "use_checkpoint", "check_exists", "is_checkpoint", "no_step"]

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """One checkpoint: the storage of its run directory, its name there, and its validated manifest."""

    storage: Storage
    name: str
    manifest: Manifest

    @property
    def path(self) -> str:
        return f"{self.storage.url}/{self.name}"


def find_checkpoint(source: str | os.PathLike[str], step: int | None = None,
                    storage_options: dict[str, Any] | None = None, *, quiet: bool = False) -> Target:
    """The checkpoint ``source`` names, its manifest validated (tensor data is not read)."""
    return use_checkpoint(source, step, storage_options, lambda target: target, quiet=quiet)


def use_checkpoint(source: str | os.PathLike[str], step: int | None, storage_options: dict[str, Any] | None,
                   use: Callable[[Target], T], *, quiet: bool = False) -> T:
    """``use(the checkpoint source names)``; see the module's docstring for which one and the errors."""
    full = os.fspath(source).rstrip("/") if is_url(source) else os.path.abspath(os.fspath(source))
    check_exists(full)
    if is_checkpoint(full, storage_options):
        target = _open(*split_checkpoint_path(full, storage_options))
        if step is not None and step != target.manifest.step:
            raise CheckpointNotFoundError(f"{full} is the checkpoint of step {target.manifest.step}, not of step "
                                          f"{step}; to choose a step, give the run directory that holds it")
        return use(target)
    run = open_run(full, storage_options)
    steps = committed_steps(run)
    if not steps:
        raise CheckpointNotFoundError(f"{full}: neither a checkpoint (no manifest.json) nor a run directory with "
                                      "checkpoints (no step_* directories)")
    if step is not None:
        if step not in steps:
            raise no_step(full, step, steps)
        return use(_open(run, step_name(step)))
    problems = []
    for candidate in reversed(steps):
        name = step_name(candidate)
        try:
            return use(_open(run, name))
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:  # not found: deleted since the listing
            if isinstance(exc, CorruptCheckpointError) and not is_damage(exc):
                raise
            problems.append(f"step {candidate}: {exc}")
            if not quiet:
                warn(f"skipping checkpoint {run.url}/{name}: {exc}", CheckpointSkippedWarning)
    raise CorruptCheckpointError(f"{full}: no valid checkpoint ({'; '.join(problems)})")


def check_exists(path: str | os.PathLike[str]) -> None:
    """:class:`CheckpointNotFoundError` for a local path that is missing or is not a directory.  A
    URL is not checked here: the store says what is missing (a bucket, a run) when it is opened."""
    if is_url(path):
        return
    full = os.path.abspath(os.fspath(path))
    if not os.path.lexists(full):
        raise CheckpointNotFoundError(f"{full}: no such path")
    if not os.path.isdir(full):
        raise CheckpointNotFoundError(f"{full}: not a directory (expected a run directory or a checkpoint "
                                      "directory)")


def is_checkpoint(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is one checkpoint; a URL with no parent (``s3://bucket``) can only be a run."""
    try:
        return is_checkpoint_dir(path, storage_options)
    except ValueError:  # "a checkpoint URL needs a parent"; any other fault shows when the run is opened
        return False


def no_step(where: str, step: int, steps: Sequence[int]) -> CheckpointNotFoundError:
    """The error for a step that the run at ``where`` does not have, naming the steps it has."""
    there = ", ".join(map(str, steps)) or "none"
    return CheckpointNotFoundError(f"{where}: no step {step} (steps there: {there})")


def _open(storage: Storage, name: str) -> Target:
    manifest = read_manifest(storage, name)
    check_named_step(storage, name, manifest)
    return Target(storage, name, manifest)
