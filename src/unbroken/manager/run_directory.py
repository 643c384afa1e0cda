"""Opening a local or remote run directory for a manager: refused early, with the fix, when it
cannot hold checkpoints (a single checkpoint's directory, a read-only filesystem)."""

from __future__ import annotations

import errno
import os
import uuid
from typing import Any

from ..errors import StorageError
from ..storage import LocalStorage, Storage, is_url, open_storage
from ..storage.paths import is_checkpoint_dir

__all__ = ["open_run_directory"]


def open_run_directory(directory: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> Storage:
    if is_url(directory):
        return open_storage(directory, storage_options, create=True)
    if storage_options:
        raise ValueError("storage_options apply to a URL run directory (s3://...), not to a local path")
    path = os.path.abspath(os.fspath(directory))
    if is_checkpoint_dir(path):
        raise ValueError(f"{path} is a single checkpoint, not a run directory; use its parent as the "
                         "run directory, or restore(path=...) to resume from it")
    try:
        storage = LocalStorage(path)
        probe = os.path.join(path, f".probe-{uuid.uuid4().hex[:8]}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        hint = "it is on a read-only filesystem" if exc.errno == errno.EROFS else exc.strerror
        raise StorageError(exc.errno, f"cannot write checkpoints to {path}: {hint}. Fix: choose a writable "
                           "directory (or fix its permissions/mount)") from exc
    return storage
