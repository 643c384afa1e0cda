"""Real small/read-only filesystems for failure tests (tmpfs mounts; skipped where not permitted)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["tmpfs", "remount"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m", read_only: bool = False) -> Iterator[Path]:
    """Mount a size-limited tmpfs at ``path`` for the duration; skip the test if mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    with _mounted(path, "mount a tmpfs", "-t", "tmpfs", "-o", options, "tmpfs", str(path)):
        yield path


def remount(path: Path, read_only: bool) -> None:
    result = _run("mount", "-o", "remount," + ("ro" if read_only else "rw"), str(path))
    if result.returncode != 0:
        pytest.skip(f"cannot remount {path}: {result.stderr.strip()}")


@contextlib.contextmanager
def bind_mount(path: Path) -> Iterator[Path]:
    """Bind-mount ``path`` on itself: it can then not be renamed (EBUSY), a real undeletable directory."""
    with _mounted(path, "bind-mount", "--bind", str(path), str(path)):
        yield path


@contextlib.contextmanager
def _mounted(path: Path, what: str, *mount_args: str) -> Iterator[None]:
    """``mount *mount_args`` for the duration (lazily unmounted after); skip the test where not allowed."""
    result = _run("mount", *mount_args) if os.geteuid() == 0 else None
    if result is None or result.returncode != 0:
        pytest.skip(f"cannot {what} here ({result.stderr.strip() if result else 'not root'})")
    try:
        yield
    finally:
        _run("umount", "-l", str(path))
