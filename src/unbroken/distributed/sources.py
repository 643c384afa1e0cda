"""Where a rank's checkpoint bytes come from when it restores: its own reads, or rank 0's broadcast.

A rank asks for byte ranges of stored tensors (:class:`Need`), aligned to what a checksum covers:
a whole tensor, or whole blocks of a tensor that has per-block checksums.  Every byte handed out
was verified against its checksum on the rank that uses it.

* :class:`DirectSource` (default): each rank reads its ranges itself (ranged reads; adjacent
  ranges of one file are read with one call).
* :class:`BroadcastSource` (``restore_mode="broadcast"``): rank 0 reads the manifest and the union
  of every rank's ranges, and broadcasts them in chunks; the other ranks never touch the storage
  (node-local disks, or many ranks reading the same bytes from a slow filesystem).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..format import MANIFEST_NAME, Manifest, TensorEntry
from ..io.checksum import crc32c
from ..io.plan import SMALL_TENSOR
from ..io.reader import check_crc, check_tensor_file, read_manifest, read_manifest_bytes
from ..io.tensor_bytes import byte_view
from ..storage import ReadHandle, Storage
from .collectives import Comm

__all__ = ["Need", "Source", "DirectSource", "BroadcastSource", "aligned"]

COALESCE_BYTES = 64 << 20
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True, order=True)
class Need:
    """Bytes ``[lo, hi)`` of stored tensor ``tensor`` (offsets from the tensor's first byte)."""

    tensor: str
    lo: int
    hi: int


def aligned(entry: TensorEntry, tensor: str, lo: int, hi: int) -> Need:
    """The smallest verifiable range holding ``[lo, hi)``: whole blocks, or the whole tensor."""
    if not entry.block_bytes:
        return Need(tensor, 0, entry.nbytes)
    size = entry.block_bytes
    return Need(tensor, lo // size * size, min(-(-hi // size) * size, entry.nbytes))


def verify(data: memoryview, need: Need, entry: TensorEntry, where: str) -> None:
    if not entry.block_bytes:
        check_crc(data, need.tensor, entry, where)
        return
    size, first = entry.block_bytes, need.lo // entry.block_bytes
    for index in range(-(-len(data) // size)):
        found = crc32c(data[index * size:(index + 1) * size])
        expected = entry.block_crc32c[first + index]
        if found != expected:
            raise CorruptCheckpointError(
                f"{where}: tensor {need.tensor!r} block {first + index} checksum mismatch (expected crc32c "
                f"{expected:08x}, found {found:08x}); the data is corrupt")


class Source:
    """Verified checkpoint bytes for this rank; ``bytes_read`` counts what it read from storage."""

    bytes_read = 0

    def manifest(self, storage: Storage, name: str) -> Manifest:
        raise NotImplementedError

    def fetch(self, storage: Storage, name: str, manifest: Manifest, needs: list[Need]) -> dict[Need, torch.Tensor]:
        raise NotImplementedError


class DirectSource(Source):
    def manifest(self, storage: Storage, name: str) -> Manifest:
        return read_manifest(storage, name)

    def fetch(self, storage: Storage, name: str, manifest: Manifest, needs: list[Need]) -> dict[Need, torch.Tensor]:
        by_file: dict[str, list[Need]] = defaultdict(list)
        for need in needs:
            by_file[manifest.tensors[need.tensor].file].append(need)
        out: dict[Need, torch.Tensor] = {}
        for file_name, wanted in by_file.items():
            where = f"{storage.url}/{name}/{file_name}"
            with storage.open(name, file_name) as handle:
                check_tensor_file(handle, manifest, file_name, where)
                for run in _runs(sorted(wanted, key=lambda n: _start(manifest, n)), manifest):
                    self._read_run(handle, run, manifest, where, out)
        return out

    def _read_run(self, handle: ReadHandle, run: list[Need], manifest: Manifest, where: str,
                  out: dict[Need, torch.Tensor]) -> None:
        start = _start(manifest, run[0])
        raw = torch.empty(_start(manifest, run[-1]) + run[-1].hi - run[-1].lo - start, dtype=torch.uint8)
        handle.read_into(start, byte_view(raw))
        self.bytes_read += raw.numel()
        for need in run:
            piece = raw[_start(manifest, need) - start:][:need.hi - need.lo]
            verify(byte_view(piece), need, manifest.tensors[need.tensor], where)
            out[need] = piece


def _start(manifest: Manifest, need: Need) -> int:
    return manifest.tensors[need.tensor].begin + need.lo


def _runs(needs: list[Need], manifest: Manifest) -> list[list[Need]]:
    """Needs of one file, in file order: small ones grouped into contiguous runs of at most
    COALESCE_BYTES (one read each); a large one alone, so its buffer can become the tensor."""
    runs: list[list[Need]] = []
    for need in needs:
        if need.hi - need.lo > SMALL_TENSOR:
            runs.append([need])
            continue
        if runs and runs[-1][-1].hi - runs[-1][-1].lo <= SMALL_TENSOR:
            last, first = runs[-1][-1], runs[-1][0]
            end = _start(manifest, last) + last.hi - last.lo
            if _start(manifest, need) == end and end - _start(manifest, first) + need.hi - need.lo <= COALESCE_BYTES:
                runs[-1].append(need)
                continue
        runs.append([need])
    return runs


class BroadcastSource(Source):
    """Rank 0 reads, every rank receives (collective: every rank calls each method in turn)."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def manifest(self, storage: Storage, name: str) -> Manifest:
        raw: bytes | None = None
        status: dict[str, Any] = {"ok": True}
        if self.comm.rank == 0:
            try:
                raw = _manifest_bytes(storage, name)
                self.bytes_read += len(raw)
            except (CorruptCheckpointError, OSError) as exc:
                status = {"ok": False, "error": str(exc)}
        status = self.comm.broadcast_json(status)
        if not status["ok"]:
            raise CorruptCheckpointError(f"rank 0 could not read the manifest of {name}: {status['error']}")
        raw = self.comm.broadcast_bytes(raw)
        return Manifest.from_json(raw, f"{storage.url}/{name}/{MANIFEST_NAME} (broadcast by rank 0)")

    def fetch(self, storage: Storage, name: str, manifest: Manifest, needs: list[Need]) -> dict[Need, torch.Tensor]:
        wanted = self.comm.gather_json([[n.tensor, n.lo, n.hi] for n in needs])
        chunks = self.comm.broadcast_json(_chunks(wanted) if wanted is not None else None)
        out = {need: torch.empty(need.hi - need.lo, dtype=torch.uint8) for need in needs}
        by_tensor: dict[str, list[Need]] = defaultdict(list)
        for need in needs:
            by_tensor[need.tensor].append(need)
        reader = _ChunkReader(storage, name, manifest) if self.comm.rank == 0 else None
        try:
            for tensor, lo, hi in chunks:
                buffer = torch.empty(hi - lo, dtype=torch.uint8)
                if reader is not None:
                    reader.read(Need(tensor, lo, hi), buffer)
                    self.bytes_read += buffer.numel()
                self.comm.broadcast_into(buffer)
                for need in by_tensor.get(tensor, []):
                    a, b = max(lo, need.lo), min(hi, need.hi)
                    if a < b:
                        out[need][a - need.lo:b - need.lo].copy_(buffer[a - lo:b - lo])
        finally:
            if reader is not None:
                reader.close()
        status = self.comm.broadcast_json({"error": reader.failure if reader is not None else None})
        if status["error"] is not None:
            raise CorruptCheckpointError(f"rank 0 could not read {storage.url}/{name}: {status['error']}")
        for need, data in out.items():
            verify(byte_view(data), need, manifest.tensors[need.tensor], f"{storage.url}/{name} (broadcast)")
        return out


class _ChunkReader:
    """Rank 0's reads for a broadcast: each file opened once and checked against the manifest.

    A failure is remembered (and later chunks are sent as zeros) so every rank still takes part in
    every broadcast; the failure is announced once all chunks are through.
    """

    def __init__(self, storage: Storage, name: str, manifest: Manifest) -> None:
        self.storage, self.name, self.manifest = storage, name, manifest
        self.failure: str | None = None
        self._handles: dict[str, ReadHandle] = {}

    def read(self, need: Need, buffer: torch.Tensor) -> None:
        if self.failure is not None:
            buffer.zero_()
            return
        entry = self.manifest.tensors[need.tensor]
        try:
            self._handle(entry.file).read_into(entry.begin + need.lo, byte_view(buffer))
        except (CorruptCheckpointError, OSError) as exc:
            self.failure = str(exc)
            buffer.zero_()

    def _handle(self, file_name: str) -> ReadHandle:
        handle = self._handles.get(file_name)
        if handle is None:
            where = f"{self.storage.url}/{self.name}/{file_name}"
            handle = self.storage.open(self.name, file_name)
            self._handles[file_name] = handle
            check_tensor_file(handle, self.manifest, file_name, where)
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


def _manifest_bytes(storage: Storage, name: str) -> bytes:
    """The raw manifest, validated (it parses and its seal matches), to hand to the other ranks."""
    raw = read_manifest_bytes(storage, name)
    Manifest.from_json(raw, f"{storage.url}/{name}/{MANIFEST_NAME}")
    return raw


def _chunks(wanted: list[list[list[Any]]]) -> list[list[Any]]:
    """The union of every rank's ranges, per tensor, split into broadcast chunks of whole blocks."""
    ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for needs in wanted:
        for tensor, lo, hi in needs:
            ranges[tensor].append((lo, hi))
    chunks: list[list[Any]] = []
    for tensor in sorted(ranges):
        for lo, hi in _union(ranges[tensor]):
            chunks += [[tensor, start, min(hi, start + CHUNK_BYTES)] for start in range(lo, hi, CHUNK_BYTES)]
    return chunks


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged
