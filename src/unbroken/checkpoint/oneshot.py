"""``unbroken.save(path, state)`` / ``unbroken.load(path, state)``: one checkpoint, no manager."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from ..errors import CheckpointExistsError, CheckpointNotFoundError
from ..storage import LocalStorage, is_url, parse_step_name
from ..storage.paths import is_checkpoint_dir, open_run, split_checkpoint_path
from .listing import CheckpointRecord, record_of
from .newest import restore_newest
from .single import load_checkpoint, save_checkpoint

__all__ = ["save", "load"]


def save(path: str | os.PathLike[str], state: Mapping[str, Any], *, step: int = 0,
         metrics: Mapping[str, Any] | None = None, metadata: Any = None, rng: bool = True,
         storage_options: dict[str, Any] | None = None) -> CheckpointRecord:
    """Save ``state`` as the checkpoint directory (or URL) ``path`` (crash-safe; never overwrites).

    A path named like a run's checkpoint (``step_N``) must hold step N (``step=N``): a run resumes
    from such a directory by its name, and treats one whose manifest disagrees as corrupt."""
    named = parse_step_name(os.path.basename(os.fspath(path).rstrip("/")))  # a local path or a URL
    if named is not None and named != step:
        raise ValueError(f"{os.fspath(path)} is named for step {named} but step={step}; pass step={named}, or "
                         "choose a name that is not step_<number> (runs resume from those by their name)")
    if is_url(path):
        parent, _, name = os.fspath(path).rstrip("/").rpartition("/")
        storage = open_run(parent, storage_options, create=True)
        if storage.exists(name):
            raise CheckpointExistsError(f"{storage.url}/{name} already exists; choose a new path")
        manifest = save_checkpoint(storage, name, state, step, metrics=metrics, metadata=metadata, rng=rng)
        return record_of(storage, name, manifest)
    full = os.path.abspath(os.fspath(path))
    if os.path.lexists(full):
        raise CheckpointExistsError(f"{full} already exists; choose a new path (checkpoints are never overwritten)")
    parent, name = os.path.split(full)
    storage = LocalStorage(parent)
    manifest = save_checkpoint(storage, name, state, step, metrics=metrics, metadata=metadata, rng=rng)
    return record_of(storage, name, manifest)


def load(path: str | os.PathLike[str], state: MutableMapping[str, Any], *, strict: bool = True,
         rng: bool | None = None, only: bool = False, storage_options: dict[str, Any] | None = None
         ) -> CheckpointRecord:
    """Verify and restore the checkpoint at ``path`` into ``state``.

    ``path`` is a checkpoint directory, or a run directory (its newest valid checkpoint is used);
    either may be a URL (``s3://bucket/run``), with ``storage_options`` for fsspec.

    ``only=True`` restores exactly the entries of ``state`` and nothing else, e.g. the model for
    inference, ``unbroken.load(run, {"model": model}, only=True)``: the saved entries ``state`` does not
    name (the optimizer, the data loader...) are ignored without a warning and not even read; the
    entries it names must be in the checkpoint and fit (``strict`` applies to them as usual).  The
    global random streams are restored only with ``rng=True``: ``rng`` defaults to True (resuming a
    training run restores them), and to False with ``only=True`` (loading a model for inference must
    not change the caller's random numbers).
    """
    restore_rng = not only if rng is None else rng
    url = is_url(path)
    full = os.fspath(path).rstrip("/") if url else os.path.abspath(os.fspath(path))
    if is_checkpoint_dir(full, storage_options):
        storage, name = split_checkpoint_path(full, storage_options)
        manifest = load_checkpoint(storage, name, state, strict=strict, rng=restore_rng, only=only)
        return record_of(storage, name, manifest)
    if not url and not os.path.isdir(full):
        raise CheckpointNotFoundError(f"{full}: no such checkpoint or run directory")
    run = open_run(full, storage_options)
    found = restore_newest(run, state, strict=strict, rng=restore_rng, only=only)
    if found is None:
        raise CheckpointNotFoundError(f"{full}: holds no valid checkpoint (no manifest.json, no step_* directory)")
    return record_of(run, os.path.basename(f"step_{found.step:09d}"), found)
