"""Reading one checkpoint from untrusted storage: every size, offset and checksum checked before use.

Order matters: the manifest is parsed and validated, each file's size and header are checked
against it, and every tensor's bytes are verified against its CRC32C before any tensor is returned.
Allocations never exceed the size of a file that actually exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..errors import CorruptCheckpointError
from ..format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PREFIX_BYTES,
    Manifest,
    TensorEntry,
    TensorSpan,
    header_length,
    parse_header,
)
from ..format.dtypes import torch_dtype
from ..storage import ReadHandle, Storage
from .checksum import crc32c

if TYPE_CHECKING:
    import torch

# Reading manifests and verifying checksums needs no tensors: torch (and the modules that import it,
# .plan and .tensor_bytes) is imported only by the functions that return tensors, so that
# ``unbroken ls`` and ``unbroken verify`` start without it.

__all__ = ["read_manifest", "read_manifest_bytes", "read_tensors", "mapped_tensors", "verify_checkpoint",
           "check_tensor_file", "check_crc"]

VerifyProgress = Callable[[str, int], Callable[[int], None] | None]
"""``progress(name, total_bytes)`` -> a callback for the bytes checked, or None (as copy_checkpoints reports)."""

# verify_checkpoint reads each file's data in windows of at most this many bytes (the whole of a large
# tensor is never in memory at once); as large as one batch of FsspecStorage's parallel ranged GETs.
_VERIFY_WINDOW = 128 << 20


def read_manifest(storage: Storage, name: str) -> Manifest:
    return Manifest.from_json(read_manifest_bytes(storage, name), f"{storage.url}/{name}/{MANIFEST_NAME}")


def read_manifest_bytes(storage: Storage, name: str) -> bytes:
    """The raw manifest (size-capped, not yet validated): to parse, or to hand on unchanged."""
    where = f"{storage.url}/{name}/{MANIFEST_NAME}"
    with storage.open(name, MANIFEST_NAME) as handle:
        if handle.size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: {handle.size} bytes, over the {MAX_MANIFEST_BYTES} cap")
        raw = bytearray(handle.size)
        handle.read_into(0, memoryview(raw))
    return bytes(raw)


def read_tensors(storage: Storage, name: str, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, each verified against its checksum."""
    return dict(_iter_tensors(storage, name, manifest))


@contextlib.contextmanager
def mapped_tensors(storage: Storage, name: str, manifest: Manifest) -> Iterator[dict[str, torch.Tensor]]:
    """Every tensor of the checkpoint, verified, as views of the files mapped into memory.

    The bytes come straight from the page cache (no allocation, no copy); every checksum is checked
    before the dict is handed out.  The views are only valid inside the ``with`` block: copy what
    must outlive it.  Storage that cannot map falls back to :func:`read_tensors`.
    """
    import torch

    from .tensor_bytes import byte_view

    maps: list[memoryview] = []
    tensors: dict[str, torch.Tensor] = {}
    try:
        for file_name, entries in _by_file(manifest).items():
            where = f"{storage.url}/{name}/{file_name}"
            with storage.open(name, file_name) as handle:
                _check_file(handle, manifest, file_name, entries, where)
                view = handle.map()
                if view is None:  # storage without memory maps: read everything the usual way
                    tensors = read_tensors(storage, name, manifest)
                    break
                maps.append(view)
            whole = torch.frombuffer(view, dtype=torch.uint8)
            for tensor_name, entry in entries:
                piece = whole[entry.begin:entry.end]
                _check_crc(byte_view(piece), tensor_name, entry, where)
                tensors[tensor_name] = _typed(piece, entry)
            del whole
        yield tensors
    finally:
        tensors.clear()
        for view in maps:
            mapped = view.obj
            view.release()
            try:
                mapped.close()  # type: ignore[attr-defined]
            except BufferError:  # a view escaped; the mapping is closed when it is collected
                pass


def _by_file(manifest: Manifest) -> dict[str, list[tuple[str, TensorEntry]]]:
    by_file: dict[str, list[tuple[str, TensorEntry]]] = {f: [] for f in manifest.files}
    for tensor_name, entry in manifest.tensors.items():
        by_file[entry.file].append((tensor_name, entry))
    return by_file


def _typed(piece: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    try:  # the writer's layout keeps each tensor aligned to its element size within a group
        return piece.view(torch_dtype(entry.dtype)).view(entry.shape)
    except RuntimeError:
        return piece.clone().view(torch_dtype(entry.dtype)).view(entry.shape)


def verify_checkpoint(storage: Storage, name: str, progress: VerifyProgress | None = None) -> Manifest:
    """Check every byte of checkpoint ``name``; its manifest, or :class:`CorruptCheckpointError`.

    The same checks, in the same order, as reading every tensor, over plain bytes (no torch).
    ``progress(name, total_bytes)``, called once the manifest is read, may return a callback that
    receives the bytes checksummed so far (they add up to ``total_bytes`` when every check passes)."""
    manifest = read_manifest(storage, name)
    files = _by_file(manifest)
    advance = None
    if progress is not None:
        advance = progress(name, sum(entry.end - entry.begin for entries in files.values() for _, entry in entries))
    for handle, entries, where in _checked_files(storage, name, manifest):
        _verify_data(handle, entries, where, advance)
    return manifest


def _checked_files(storage: Storage, name: str, manifest: Manifest
                   ) -> Iterator[tuple[ReadHandle, list[tuple[str, TensorEntry]], str]]:
    """Each tensor file of checkpoint ``name``, open and checked against the manifest (size, header),
    with its entries in file order and its path for messages."""
    for file_name, entries in _by_file(manifest).items():
        where = f"{storage.url}/{name}/{file_name}"
        with storage.open(name, file_name) as handle:
            _check_file(handle, manifest, file_name, entries, where)
            yield handle, sorted(entries, key=lambda e: e[1].begin), where


def _verify_data(handle: ReadHandle, entries: list[tuple[str, TensorEntry]], where: str,
                 advance: Callable[[int], None] | None) -> None:
    """Checksum each of ``entries`` (sorted by offset, matched to the file's spans) from windows of
    the file read in order: one read covers many small tensors, a large tensor takes several."""
    if not entries:
        return
    stop = max(entry.end for _, entry in entries)
    buffer = memoryview(bytearray(min(_VERIFY_WINDOW, stop - entries[0][1].begin)))
    window_at, window_len = 0, 0
    for tensor_name, entry in entries:
        found, at = 0, entry.begin
        while at < entry.end:
            if not window_at <= at < window_at + window_len:
                window_at, window_len = at, min(len(buffer), stop - at)
                handle.read_into(window_at, buffer[:window_len])
            upto = min(entry.end, window_at + window_len)
            found = crc32c(buffer[at - window_at:upto - window_at], found)
            if advance is not None:
                advance(upto - at)
            at = upto
        _check_found(found, tensor_name, entry, where)


def _iter_tensors(storage: Storage, name: str, manifest: Manifest) -> Iterator[tuple[str, torch.Tensor]]:
    for handle, entries, where in _checked_files(storage, name, manifest):
        for block in _blocks(entries):
            if len(block) == 1:
                yield block[0][0], _read_tensor(handle, block[0][0], block[0][1], where)
            else:
                yield from _read_block(handle, block, where)


def check_tensor_file(handle: ReadHandle, manifest: Manifest, file_name: str, where: str) -> None:
    """Check an open tensor file against the manifest: its size, header checksum, and header entries."""
    _check_file(handle, manifest, file_name, _by_file(manifest).get(file_name, []), where)


def check_crc(view: memoryview, tensor_name: str, entry: TensorEntry, where: str) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``view`` holds the bytes of the whole tensor."""
    _check_crc(view, tensor_name, entry, where)


def _check_file(handle: ReadHandle, manifest: Manifest, file_name: str,
                entries: list[tuple[str, TensorEntry]], where: str) -> None:
    expected = manifest.files[file_name]
    if handle.size != expected.size:
        raise CorruptCheckpointError(
            f"{where}: file is {handle.size} bytes but the manifest says {expected.size} (truncated or replaced)")
    prefix = bytearray(PREFIX_BYTES)
    handle.read_into(0, memoryview(prefix))
    body = bytearray(header_length(bytes(prefix), handle.size, where))
    handle.read_into(PREFIX_BYTES, memoryview(body))
    found = crc32c(bytes(body), crc32c(bytes(prefix)))
    if found != expected.header_crc32c:
        raise CorruptCheckpointError(
            f"{where}: header checksum mismatch (expected crc32c {expected.header_crc32c:08x}, found {found:08x})")
    spans = {s.name: s for s in parse_header(bytes(body), handle.size, where)}
    _match_spans(spans, entries, where)


def _match_spans(spans: dict[str, TensorSpan], entries: list[tuple[str, TensorEntry]], where: str) -> None:
    listed = {n for n, _ in entries}
    if listed != set(spans):
        extra, missing = sorted(set(spans) - listed), sorted(listed - set(spans))
        raise CorruptCheckpointError(f"{where}: tensors differ from the manifest (missing {missing[:5]}, "
                                     f"unlisted {extra[:5]})")
    for tensor_name, entry in entries:
        span = spans[tensor_name]
        if (span.dtype, span.shape, span.begin, span.end) != (entry.dtype, entry.shape, entry.begin, entry.end):
            raise CorruptCheckpointError(
                f"{where}: tensor {tensor_name!r} is {span.dtype}{list(span.shape)} at bytes "
                f"[{span.begin}, {span.end}) but the manifest says {entry.dtype}{list(entry.shape)} at "
                f"[{entry.begin}, {entry.end})")


def _blocks(entries: list[tuple[str, TensorEntry]]) -> Iterator[list[tuple[str, TensorEntry]]]:
    """Runs of small tensors of one state entry, read with one system call each."""
    from .plan import BATCH_BYTES, SMALL_TENSOR, group_of

    block: list[tuple[str, TensorEntry]] = []
    for tensor_name, entry in entries:
        small = entry.end - entry.begin <= SMALL_TENSOR
        if block and (not small or group_of(tensor_name) != group_of(block[0][0])
                      or entry.end - block[0][1].begin > BATCH_BYTES):
            yield block
            block = []
        if small:
            block.append((tensor_name, entry))
        else:
            yield [(tensor_name, entry)]
    if block:
        yield block


def _read_block(handle: ReadHandle, block: list[tuple[str, TensorEntry]], where: str
                ) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    from .tensor_bytes import byte_view

    start = block[0][1].begin
    raw = torch.empty(block[-1][1].end - start, dtype=torch.uint8)
    handle.read_into(start, byte_view(raw))
    for tensor_name, entry in block:
        piece = raw[entry.begin - start:entry.end - start]
        _check_crc(byte_view(piece), tensor_name, entry, where)
        yield tensor_name, _typed(piece, entry)


def _check_crc(view: memoryview, tensor_name: str, entry: TensorEntry, where: str) -> None:
    _check_found(crc32c(view), tensor_name, entry, where)


def _check_found(found: int, tensor_name: str, entry: TensorEntry, where: str) -> None:
    if found != entry.crc32c:
        raise CorruptCheckpointError(
            f"{where}: tensor {tensor_name!r} checksum mismatch (expected crc32c {entry.crc32c:08x}, "
            f"found {found:08x}); the data is corrupt")


def _read_tensor(handle: ReadHandle, tensor_name: str, entry: TensorEntry, where: str) -> torch.Tensor:
    import torch

    from .tensor_bytes import byte_view

    tensor = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    view = byte_view(tensor)
    handle.read_into(entry.begin, view)
    _check_crc(view, tensor_name, entry, where)
    return tensor
