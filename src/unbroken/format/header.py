"""The safetensors file layout: an 8-byte little-endian header length, a JSON header, then raw bytes.

:func:`build_header` lays tensors out back to back; :func:`parse_header` reads a header from an
untrusted file and checks everything a reader relies on before any tensor byte is touched: the
header size cap, known dtypes, ``numel * itemsize`` equal to each span, spans that are contiguous,
non-overlapping and cover the file exactly.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _quoted  # json.dumps(s, ensure_ascii=False), minus its set-up

from .._internal.gcpause import paused_gc
from ..errors import CorruptCheckpointError
from .dtypes import ITEMSIZES, itemsize

__all__ = ["TensorSpan", "build_header", "parse_header", "MAX_HEADER_BYTES", "PREFIX_BYTES"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap
PREFIX_BYTES = 8
MAX_NDIM = 64
_ALIGN = 8


@dataclass(frozen=True)
class TensorSpan:
    """One tensor's place in a file. ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def build_header(entries: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[TensorSpan]]:
    """The header bytes (length prefix included) for ``(name, dtype, shape)`` entries, and their spans."""
    parts = ['{"__metadata__":{"format":"pt"}']
    relative = 0
    layout: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * itemsize(dtype)
        dims = ",".join(map(str, shape))
        parts.append(f'{_quoted(name)}:{{"dtype":"{dtype}","shape":[{dims}],'
                     f'"data_offsets":[{relative},{relative + nbytes}]}}')
        layout.append((name, dtype, shape, relative, relative + nbytes))
        relative += nbytes
    body = (",".join(parts) + "}").encode("utf-8")
    body += b" " * (-len(body) % _ALIGN)  # keeps the data 8-byte aligned, as safetensors does
    start = PREFIX_BYTES + len(body)
    spans = [TensorSpan(n, d, s, start + b, start + e) for n, d, s, b, e in layout]
    return struct.pack("<Q", len(body)) + body, spans


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte prefix of a file of ``file_size`` bytes; the JSON header's length."""
    if len(prefix) < PREFIX_BYTES or file_size < PREFIX_BYTES:
        raise CorruptCheckpointError(f"{where}: file is {file_size} bytes, too short for a safetensors header")
    length: int = struct.unpack("<Q", prefix[:PREFIX_BYTES])[0]
    if length > MAX_HEADER_BYTES or length > file_size - PREFIX_BYTES:
        raise CorruptCheckpointError(
            f"{where}: header claims {length} bytes but the file holds {file_size} bytes "
            f"(cap {MAX_HEADER_BYTES}); the file is truncated or not a safetensors file"
        )
    return length


def parse_header(body: bytes, file_size: int, where: str) -> list[TensorSpan]:
    """Parse and validate a JSON header (without its prefix) of a file of ``file_size`` bytes."""
    try:
        with paused_gc():
            table = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, >4300-digit ints
        raise CorruptCheckpointError(f"{where}: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(table, dict):
        raise CorruptCheckpointError(f"{where}: header is not a JSON object")
    start = PREFIX_BYTES + len(body)
    spans = [_parse_entry(name, entry, start, where) for name, entry in table.items() if name != "__metadata__"]
    _check_layout(spans, start, file_size, where)
    return spans


def _parse_entry(name: str, entry: object, start: int, where: str) -> TensorSpan:
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{where}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_count(d) for d in shape)):
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * itemsize(dtype)  # Python ints: no overflow
    if end - begin != expected:
        raise CorruptCheckpointError(
            f"{where}: tensor {name!r} spans {end - begin} bytes but dtype {dtype} × shape {shape} "
            f"needs {expected}"
        )
    return TensorSpan(name, dtype, tuple(shape), start + begin, start + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _check_layout(spans: list[TensorSpan], start: int, file_size: int, where: str) -> None:
    cursor = start
    for span in sorted(spans, key=lambda s: (s.begin, s.end)):
        if span.begin != cursor:
            kind = "overlaps the previous tensor" if span.begin < cursor else "leaves a gap before it"
            raise CorruptCheckpointError(f"{where}: tensor {span.name!r} at byte {span.begin} {kind}")
        cursor = span.end
    if cursor != file_size:
        raise CorruptCheckpointError(
            f"{where}: tensors end at byte {cursor} but the file is {file_size} bytes "
            f"({'truncated' if cursor > file_size else 'trailing bytes'})"
        )
