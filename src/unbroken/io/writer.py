"""Writing one checkpoint: tensors streamed into a safetensors file, checksummed on the fly, then commit.

:class:`SyncWriter` runs a save job on the caller's thread.  The manager only talks to the
:class:`Writer` interface (submit a job, get a future), so an asynchronous writer can replace it
without touching the manager.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import replace

import torch

from ..format import FileEntry, Manifest, TensorEntry, build_header, dtype_name
from ..storage import Storage, WriteHandle
from .checksum import crc32c
from .tensor_bytes import byte_view, host_tensor

__all__ = ["write_checkpoint", "Writer", "SyncWriter"]


def write_checkpoint(storage: Storage, name: str, tensors: Mapping[str, torch.Tensor], manifest: Manifest,
                     file_name: str = "rank00000.safetensors") -> Manifest:
    """Write ``tensors`` and the completed ``manifest`` as checkpoint ``name``; the committed manifest.

    On any error the staging area is removed and committed checkpoints are untouched.
    """
    staging = storage.begin(name)
    try:
        file_entry, entries = _write_tensor_file(staging.create(file_name), file_name, tensors)
        final = replace(manifest, files={file_name: file_entry}, tensors=entries)
        staging.commit(final.to_json())
    except BaseException:
        staging.abort()
        raise
    return final


def _write_tensor_file(handle: WriteHandle, file_name: str, tensors: Mapping[str, torch.Tensor]
                       ) -> tuple[FileEntry, dict[str, TensorEntry]]:
    header, spans = build_header([(n, dtype_name(t.dtype, n), tuple(t.shape)) for n, t in tensors.items()])
    try:
        handle.write(memoryview(header))
        entries = {}
        for span in spans:
            data = byte_view(host_tensor(tensors[span.name], span.name))
            handle.write(data)
            entries[span.name] = TensorEntry(file_name, span.dtype, span.shape, span.begin, span.end, crc32c(data))
        handle.close()
    except BaseException:
        handle.abort()
        raise
    size = spans[-1].end if spans else len(header)
    return FileEntry(size=size, header_crc32c=crc32c(header)), entries


class Writer:
    """Runs save jobs; ``submit`` returns a future of the committed manifest."""

    def submit(self, job: Callable[[], Manifest]) -> Future[Manifest]:
        raise NotImplementedError

    def wait(self) -> None:
        """Block until every submitted job finished (errors stay in their futures)."""

    def close(self) -> None:
        self.wait()


class SyncWriter(Writer):
    """Runs each job immediately on the calling thread."""

    def submit(self, job: Callable[[], Manifest]) -> Future[Manifest]:
        future: Future[Manifest] = Future()
        try:
            future.set_result(job())
        except Exception as exc:  # delivered through the future, like an asynchronous writer would
            future.set_exception(exc)
        return future
