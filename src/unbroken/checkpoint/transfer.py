"""Copying one committed checkpoint between two storages (local disk, a bucket), with the same commit.

The destination goes through its own staging and commit: the data files first, the manifest (the
very bytes of the source's, checksum included) last, so a copy interrupted at any point is never a
committed checkpoint there.  Only verified checkpoints travel: the source is checked before an
upload (reading local files is cheap next to the upload), and a download is checked after it lands
and removed if it does not verify.  A step the destination already has is not copied again, so a
retried copy is idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..io import read_manifest, read_manifest_bytes, verify_checkpoint
from ..storage import Staging, Storage

__all__ = ["copy_checkpoint", "CopyResult"]

CHUNK_BYTES = 8 * 1024 * 1024

Progress = Callable[[int], None]
"""Called with the number of bytes just copied."""


@dataclass(frozen=True)
class CopyResult:
    name: str
    bytes: int
    seconds: float
    copied: bool  # False when the destination already had it

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def copy_checkpoint(source: Storage, dest: Storage, name: str, verify_source: bool = True,
                    progress: Progress | None = None) -> CopyResult:
    """Copy committed checkpoint ``name`` from ``source`` to ``dest``; raises on any failure, leaving
    nothing committed at ``dest`` (and ``source`` untouched)."""
    started = time.monotonic()
    if dest.exists(name) and _is_committed(dest, name):
        return CopyResult(name, 0, 0.0, copied=False)
    manifest = verify_checkpoint(source, name) if verify_source else read_manifest(source, name)
    raw_manifest = read_manifest_bytes(source, name)
    staging = dest.begin(name)
    copied = 0
    try:
        for file_name in manifest.files:
            copied += _copy_file(source, staging, name, file_name, progress)
        staging.commit(raw_manifest)
    except BaseException:
        staging.abort()
        raise
    if not verify_source:  # a download: check what landed before anything uses it
        try:
            verify_checkpoint(dest, name)
        except CorruptCheckpointError:
            dest.delete(name)
            raise
    return CopyResult(name, copied + len(raw_manifest), time.monotonic() - started, copied=True)


def _is_committed(storage: Storage, name: str) -> bool:
    try:
        read_manifest(storage, name)
        return True
    except (CorruptCheckpointError, CheckpointNotFoundError):
        return False


def _copy_file(source: Storage, staging: Staging, name: str, file_name: str, progress: Progress | None) -> int:
    buffer = bytearray(CHUNK_BYTES)
    with source.open(name, file_name) as handle:
        writer = staging.create(file_name)
        try:
            offset = 0
            while offset < handle.size:
                n = min(CHUNK_BYTES, handle.size - offset)
                view = memoryview(buffer)[:n]
                handle.read_into(offset, view)
                writer.write(view)
                offset += n
                if progress is not None:
                    progress(n)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return handle.size

