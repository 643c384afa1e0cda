"""Where checkpoints are: a run directory's committed steps, and a checkpoint path or URL split into
(the storage of its run directory, its name)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import CheckpointNotFoundError
from .base import MANIFEST_FILE, QUARANTINE_PREFIX, Storage, parse_step_name
from .opening import is_url, open_storage

__all__ = ["committed_steps", "quarantined_names", "split_checkpoint_path", "open_run", "is_checkpoint_dir"]


def committed_steps(storage: Storage) -> list[int]:
    steps = (parse_step_name(n) for n in storage.names())
    return sorted(s for s in steps if s is not None)


def quarantined_names(storage: Storage) -> list[str]:
    """The checkpoints moved out of the way as corrupt (``corrupt-step_N-<time>-<id>``), oldest step first."""
    return sorted(n for n in storage.names() if n.startswith(QUARANTINE_PREFIX))


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
    return os.path.lexists(os.path.join(os.fspath(path), MANIFEST_FILE))

def _split_url(url: str) -> tuple[str, str]:
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/") or parent.endswith(":"):
        raise ValueError(f"{url}: a checkpoint URL needs a parent, e.g. s3://bucket/run/step_000000100")
    return parent, name

