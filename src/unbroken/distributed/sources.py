"""Where a rank's checkpoint bytes come from when it restores: its own reads, or rank 0's broadcast.

A rank asks for byte ranges of stored tensors (:class:`Need`), aligned to what a checksum covers:
a whole tensor, or whole blocks of a tensor that has per-block checksums.  Every byte handed out
was verified against its checksum on the rank that uses it.

* :class:`DirectSource` (default): each rank reads its ranges itself (ranged reads; adjacent
  ranges of one file are read with one call).
* :class:`BroadcastSource` (``restore_mode="broadcast"``): rank 0 reads the manifest and the union
  of every rank's ranges, and broadcasts them in chunks; the other ranks never touch the storage
  (node-local disks, or many ranks reading the same bytes from a slow filesystem).
* :class:`SpreadSource` (``restore_mode="spread"``, and ``"auto"`` above :data:`AUTO_DIRECT_MAX_RANKS`
  ranks): the ranges every rank needs (a DDP model's replicated tensors) are read once, each file by
  one rank, and broadcast by that rank; the rest (a rank's own pieces and state) each rank reads
  itself.  In direct mode every rank of a DDP job reads every file (N² opens at N ranks); here each
  rank opens about files/N files plus its own.
"""

from __future__ import annotations

import heapq
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

__all__ = ["Need", "Source", "DirectSource", "BroadcastSource", "SpreadSource", "aligned", "source_for",
           "RESTORE_MODES", "AUTO_DIRECT_MAX_RANKS"]

COALESCE_BYTES = 64 << 20
CHUNK_BYTES = 64 << 20
RESTORE_MODES = ("auto", "direct", "spread", "broadcast")
#: ``restore_mode="auto"`` reads directly up to this many ranks (about N² file opens: 64 at 8 ranks) and
#: spreads the shared reads above it (about N opens in all).
AUTO_DIRECT_MAX_RANKS = 8


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


class SpreadSource(Source):
    """Every range that every rank needs is read by one rank (whole files assigned to ranks) and
    broadcast by it; each rank reads the rest itself.  Collective: every rank calls each method in turn,
    whatever failed locally, and every rank ends each call with the same outcome."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def manifest(self, storage: Storage, name: str) -> Manifest:
        manifest: Manifest | None = None
        error: Exception | None = None
        try:
            manifest = read_manifest(storage, name)
        except Exception as exc:  # every rank must reach the agreement below
            error = exc
        _agree_or_raise(self.comm, error, f"the manifest of {storage.url}/{name}")
        if manifest is None:
            raise CorruptCheckpointError(f"internal error: no manifest of {storage.url}/{name} and no error")
        return manifest

    def fetch(self, storage: Storage, name: str, manifest: Manifest, needs: list[Need]) -> dict[Need, torch.Tensor]:
        candidates = self.comm.broadcast_json([[n.tensor, n.lo, n.hi] for n in needs] if self.comm.rank == 0 else None)
        offered = [Need(t, lo, hi) for t, lo, hi in candidates]
        mine = set(needs)
        shared = [n for n, every in zip(offered, self.comm.all_true_each([n in mine for n in offered]), strict=True)
                  if every]
        owners = _owners(shared, manifest, self.comm.size)
        out = self._exchange(storage, name, manifest, shared, owners)
        rest = [n for n in needs if n not in out]
        direct = DirectSource()
        out.update(direct.fetch(storage, name, manifest, rest))
        self.bytes_read += direct.bytes_read
        return out

    def _exchange(self, storage: Storage, name: str, manifest: Manifest, shared: list[Need],
                  owners: dict[Need, int]) -> dict[Need, torch.Tensor]:
        """Each owner reads its share and broadcasts it; every rank verifies what it received."""
        own = [n for n in shared if owners[n] == self.comm.rank]
        data: dict[Need, torch.Tensor] = {}
        error: Exception | None = None
        try:
            reader = DirectSource()
            data = reader.fetch(storage, name, manifest, own)
            self.bytes_read += reader.bytes_read
        except Exception as exc:  # every rank must take part in every broadcast below
            error, data = exc, {}
        out: dict[Need, torch.Tensor] = {}
        for need in shared:  # the same order on every rank
            buffer = data.get(need)
            if buffer is None:  # a receiver's buffer, or the zeros that a failed owner still sends
                buffer = (torch.zeros if owners[need] == self.comm.rank else torch.empty)(
                    need.hi - need.lo, dtype=torch.uint8)
            buffer = buffer.contiguous()
            for start in range(0, buffer.numel(), CHUNK_BYTES):
                self.comm.broadcast_into(buffer[start:start + CHUNK_BYTES], src=owners[need])
            out[need] = buffer
        _agree_or_raise(self.comm, error, f"{storage.url}/{name}")
        for need, received in out.items():
            verify(byte_view(received), need, manifest.tensors[need.tensor], f"{storage.url}/{name} (spread)")
        return out


def _owners(shared: list[Need], manifest: Manifest, ranks: int) -> dict[Need, int]:
    """The rank that reads each shared range: whole files; the file rank r wrote goes to rank r (which
    reads its own state there anyway; the writers' shares were balanced at save time), any other file,
    largest first, to the rank with the fewest bytes so far.  The same on every rank: it depends only
    on the agreed ranges."""
    by_file: dict[str, list[Need]] = defaultdict(list)
    for need in shared:
        by_file[manifest.tensors[need.tensor].file].append(need)
    size = {f: sum(n.hi - n.lo for n in needs) for f, needs in by_file.items()}
    writer = {f: r for f in by_file if (r := _writer(f)) is not None and r < ranks}
    load = [0] * ranks
    owner_of: dict[str, int] = {}
    for file_name, rank in writer.items():
        owner_of[file_name] = rank
        load[rank] += size[file_name]
    heap = [(bytes_, rank) for rank, bytes_ in enumerate(load)]
    heapq.heapify(heap)  # a heap, not a scan of every rank per file: O(files log N)
    for file_name in sorted(set(by_file) - set(writer), key=lambda f: (-size[f], f)):
        bytes_, rank = heapq.heappop(heap)
        owner_of[file_name] = rank
        heapq.heappush(heap, (bytes_ + size[file_name], rank))
    return {need: owner_of[f] for f, needs in by_file.items() for need in needs}


def _writer(file_name: str) -> int | None:
    """The rank that wrote ``file_name`` (``rank00003.safetensors``: 3), None for another name."""
    stem = file_name.removesuffix(".safetensors")
    digits = stem.removeprefix("rank")
    return int(digits) if stem != digits and digits.isdigit() else None


def _agree_or_raise(comm: Comm, error: Exception | None, what: str) -> None:
    """Raise on every rank when some rank failed (its own error on that rank, the first failing rank's
    message elsewhere)."""
    first = comm.first_true(error is not None)
    if first is None:
        return
    message = comm.broadcast_json(f"{type(error).__name__}: {error}" if comm.rank == first else None, src=first)
    if error is not None:
        raise error
    raise CorruptCheckpointError(f"rank {first} could not read {what}: {message}")


def source_for(mode: str, comm: Comm) -> Source:
    """The :class:`Source` of ``restore_mode`` ``mode`` on a world of ``comm.size`` ranks."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {mode!r}")
    if mode == "auto":
        mode = "direct" if comm.size <= AUTO_DIRECT_MAX_RANKS else "spread"
    if mode == "broadcast":
        return BroadcastSource(comm)
    return SpreadSource(comm) if mode == "spread" else DirectSource()


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
