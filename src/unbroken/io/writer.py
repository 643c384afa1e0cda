"""Writing one checkpoint: a tensor file streamed from runs of bytes, checksummed on the fly, then commit.

There is one write path.  What differs between a synchronous and an asynchronous save is only
where the runs come from (live tensors or staging buffers) and which thread runs the job:
:class:`SyncWriter` runs it on the caller's thread, :class:`AsyncWriter` on one background thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from .._internal.gcpause import paused_gc
from ..errors import UnserializableStateError
from ..format import FileEntry, Manifest, TensorEntry
from ..format.manifest import tensor_entries, unreadable
from ..storage import Storage, WriteHandle
from .checksum import BlockCrc, crc32c
from .plan import FilePlan, Piece, Run

__all__ = ["write_checkpoint", "write_tensor_file", "Writer", "SyncWriter", "AsyncWriter"]

T = TypeVar("T")
WRITER_NICE = 19


def write_checkpoint(storage: Storage, name: str, plan: FilePlan, runs: Iterable[Run], manifest: Manifest,
                     file_name: str = "rank00000.safetensors") -> Manifest:
    """Write the tensor file and the completed ``manifest`` as checkpoint ``name``; the committed manifest.

    On any error the staging area is removed and committed checkpoints are untouched.
    """
    staging = storage.begin(name)
    try:
        file_entry, entries = write_tensor_file(staging.create(file_name), file_name, plan, runs)
        with paused_gc():
            final = replace(manifest, files={file_name: file_entry}, tensors=entries)
            text = final.to_json()
        problem = unreadable(text)  # readers refuse it: a commit would leave a checkpoint nothing can load
        if problem is not None:
            raise UnserializableStateError(f"saving {name} to {storage.url}: {problem}")
        staging.commit(text)
    except BaseException:
        staging.abort()
        raise
    return final


def write_tensor_file(handle: WriteHandle, file_name: str, plan: FilePlan, runs: Iterable[Run],
                      block_bytes: int = 0) -> tuple[FileEntry, dict[str, TensorEntry]]:
    """Stream one tensor file into ``handle`` and close it (durable); its file and tensor entries.

    With ``block_bytes``, tensors larger than one block also get a CRC per block (ranged reads
    verify what they read); the whole tensor's CRC is derived from those, not computed twice.

    The collector is paused while runs are made and checksummed (thousands of small objects per
    run), never across a write: a background writer must not hold it off the training thread for
    the length of the I/O.
    """
    spans = plan.spans
    crcs = [0] * len(spans)
    blocked = {i: BlockCrc(block_bytes) for i, s in enumerate(spans) if block_bytes and s.nbytes > block_bytes}
    written = 0
    iterator = iter(runs)
    try:
        handle.write(memoryview(plan.header))
        while True:
            with paused_gc():
                run = next(iterator, None)
                if run is None:
                    break
                data, pieces = run
                _checksum(data, pieces, crcs, blocked)
            handle.write(data)
            written += len(data)
        if written != plan.data_bytes:
            raise RuntimeError(f"internal error: wrote {written} data bytes, planned {plan.data_bytes}")
        handle.close()
    except BaseException:
        handle.abort()
        raise
    with paused_gc():
        entries = tensor_entries(file_name, spans, crcs)
        for index, accumulator in blocked.items():
            span = spans[index]
            whole, blocks = accumulator.finish()
            entries[span.name] = TensorEntry(file_name, span.dtype, span.shape, span.begin, span.end, whole,
                                             block_bytes, blocks)
    return FileEntry(size=plan.file_size, header_crc32c=crc32c(plan.header)), entries


def _checksum(data: memoryview, pieces: list[Piece], crcs: list[int], blocked: dict[int, BlockCrc]) -> None:
    if not blocked:
        for index, lo, hi in pieces:  # a tensor may straddle two runs: its CRC continues
            crcs[index] = crc32c(data[lo:hi], crcs[index])
        return
    for index, lo, hi in pieces:
        accumulator = blocked.get(index)
        if accumulator is None:
            crcs[index] = crc32c(data[lo:hi], crcs[index])
        else:
            accumulator.update(data[lo:hi])


class Writer:
    """Runs save jobs; ``submit`` returns a future of the job's result."""

    def submit(self, job: Callable[[], T]) -> Future[T]:
        raise NotImplementedError

    def close(self) -> None:
        """Wait for submitted jobs (their errors stay in their futures) and release resources."""


class SyncWriter(Writer):
    """Runs each job immediately on the calling thread."""

    def submit(self, job: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(job())
        except Exception as exc:  # delivered through the future, as from the asynchronous writer
            future.set_exception(exc)
        return future


def _lower_priority() -> None:
    """Give the writer thread a lower CPU priority (Linux nice is per thread): the kernel's copy of
    checkpoint bytes into the page cache then yields to the training threads on a busy machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


class AsyncWriter(Writer):
    """Runs jobs one at a time on a background thread.

    The thread spends its time in ``os.write``, ``fsync`` and CRC32C, which all release the GIL, so
    the training loop keeps running Python while a checkpoint is written.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unbroken-writer",
                                        initializer=_lower_priority)

    def submit(self, job: Callable[[], T]) -> Future[T]:
        return self._pool.submit(job)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
