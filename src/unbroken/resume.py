"""Finding what to resume from: the newest checkpoint that validates, skipping broken ones loudly."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping
from typing import Any

from .checkpoint import load_checkpoint
from .errors import CheckpointNotFoundError, CheckpointSkippedWarning, CorruptCheckpointError, PartialRestoreError
from .format import MANIFEST_NAME, Manifest
from .storage import Storage, is_url, open_storage, parse_step_name, step_name

__all__ = ["restore_newest", "restore_step", "split_checkpoint_path", "open_run", "is_checkpoint_dir"]

log = logging.getLogger("unbroken")


def committed_steps(storage: Storage) -> list[int]:
    steps = (parse_step_name(n) for n in storage.names())
    return sorted(s for s in steps if s is not None)


def restore_newest(storage: Storage, state: MutableMapping[str, Any], strict: bool, rng: bool) -> Manifest | None:
    """Restore the newest valid checkpoint; ``None`` when there is none.

    A corrupt checkpoint is skipped with a :class:`CheckpointSkippedWarning`; a checkpoint that does
    not match the live objects raises, because an older one would not match either.
    """
    partial: PartialRestoreError | None = None
    for step in reversed(committed_steps(storage)):
        name = step_name(step)
        try:
            manifest = load_checkpoint(storage, name, state, strict=strict, rng=rng)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if isinstance(exc, PartialRestoreError):
                partial = exc  # an older checkpoint overwrites every entry again; a fresh start would not
            message = f"skipping checkpoint {storage.url}/{name}: {exc}"
            log.warning(message)
            warnings.warn(message, CheckpointSkippedWarning, stacklevel=3)
            continue
        if manifest.step != step:
            raise CorruptCheckpointError(f"{storage.url}/{name}: manifest says step {manifest.step}")
        return manifest
    if partial is not None:
        raise partial
    return None


def restore_step(storage: Storage, step: int, state: MutableMapping[str, Any], strict: bool, rng: bool) -> Manifest:
    """Restore exactly ``step``; a clear error (never a silent fallback) if it is missing or broken."""
    name = step_name(step)
    if not storage.exists(name):
        available = committed_steps(storage)
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {storage.url}; available steps: "
                                      f"{available or 'none'}")
    return load_checkpoint(storage, name, state, strict=strict, rng=rng)


def split_checkpoint_path(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
                          ) -> tuple[Storage, str]:
    """A checkpoint (a local directory or a URL such as ``s3://bucket/run/step_000000100``) as
    (the storage of its run directory, its name)."""
    if is_url(path):
        parent, name = _split_url(os.fspath(path))
        storage = open_storage(parent, storage_options, create=False)
        if not storage.exists(name):
            raise CheckpointNotFoundError(f"{storage.url}/{name}: no such committed checkpoint")
        return storage, name
    full = os.path.abspath(os.fspath(path))
    if not os.path.isdir(full):
        raise CheckpointNotFoundError(f"{full}: no such checkpoint directory")
    return open_storage(os.path.dirname(full), storage_options, create=False), os.path.basename(full)


def open_run(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
             create: bool = False) -> Storage:
    """The run directory at ``path`` (local or URL); without ``create`` a missing local one raises."""
    return open_storage(path if is_url(path) else os.path.abspath(os.fspath(path)), storage_options, create=create)


def is_checkpoint_dir(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """True for one checkpoint (it holds a manifest), False for a run directory or nothing."""
    if is_url(path):
        parent, name = _split_url(os.fspath(path))
        return bool(name) and open_storage(parent, storage_options, create=False).exists(name)
    return os.path.lexists(os.path.join(os.fspath(path), MANIFEST_NAME))


def _split_url(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/") or parent.endswith(":"):
        raise ValueError(f"{url}: a checkpoint URL needs a parent, e.g. s3://bucket/run/step_000000100")
    return parent, name
