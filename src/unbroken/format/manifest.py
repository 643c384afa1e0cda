"""``manifest.json``: the record of one checkpoint, and the commit marker.

The manifest is written last, after every tensor file is durable, so a checkpoint directory without
a valid manifest was never committed.  It lists each file's size and header checksum and each
tensor's file, byte range, dtype, shape and CRC32C, so a reader can verify every byte before use.

The manifest also holds the non-tensor state (epoch, data position, arguments), so it carries its
own checksum: it ends with ``,"manifest_crc32c":N}`` where N is the CRC32C of every byte before that
member.  The check is on raw bytes (no re-serialization), and the file stays plain JSON.  Format 1.0
manifests (written before the checksum existed) are read without it.

Format 1.2 adds what a checkpoint saved by several ranks needs (all optional, so 1.0/1.1 manifests
read as before): ``rank_state`` (the state entries each rank saved for itself), ``sharded`` (tensors
stored as shards with their global offsets) and per-block checksums of large tensors, which let a
rank verify the byte range it reads without reading the whole tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _quoted
from json.encoder import encode_basestring_ascii
from typing import Any

from crc32c import crc32c

from .._internal.gcpause import paused_gc
from ..errors import CorruptCheckpointError, UnsupportedFormatError
from .cover import cover_problem
from .dtypes import ITEMSIZES
from .header import MAX_NDIM, TensorSpan

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "FileEntry", "TensorEntry", "ShardEntry", "ShardedTensor", "Manifest",
           "MANIFEST_NAME", "MAX_MANIFEST_BYTES", "MAX_MANIFEST_CONTAINERS", "check_file_name", "seal", "unreadable",
           "tensor_entries"]

FORMAT_NAME = "unbroken-checkpoint"
FORMAT_VERSION = "1.2"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# Parsing builds an object per JSON value, and an empty array costs ~64 bytes for its 3 bytes of text:
# 40 MB of "[]," would take 1 GB.  So the number of arrays and objects is capped too, far above what a
# real checkpoint holds (a few per tensor and per shard: 1M tensors, or 1000 tensors each sharded over
# 1024 ranks, stay under it); at the cap they cost ~0.6 GB.
MAX_MANIFEST_CONTAINERS = 1 << 23
CHECKSUM = "crc32c"
_VERSION = re.compile(r"^([0-9]{1,6})\.([0-9]{1,6})\Z")
_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}\Z")
_SEAL = re.compile(rb',"manifest_crc32c":([0-9]{1,10})\}\s*$')
_SEALED_SINCE_MINOR = 1
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
MAX_BLOCKS = 1 << 24


def check_file_name(name: object, where: str) -> str:
    """A file name from a manifest may only name a file inside the checkpoint, never a path."""
    if not isinstance(name, str) or not _FILE_NAME.match(name) or name in (".", "..") or name == MANIFEST_NAME:
        raise CorruptCheckpointError(f"{where}: {name!r} is not an allowed file name (no paths, [A-Za-z0-9._-])")
    return name


@dataclass(frozen=True)
class FileEntry:
    size: int
    header_crc32c: int


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    crc32c: int
    block_bytes: int = 0
    """With ``block_crc32c``: the tensor's bytes checksummed per block of this size (0: no blocks)."""
    block_crc32c: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def tensor_entries(file: str, spans: Sequence[TensorSpan], crcs: Sequence[int]) -> dict[str, TensorEntry]:
    """The entries of ``spans`` stored in ``file`` with whole-tensor checksums ``crcs`` (no blocks)."""
    entries = {}
    for span, crc in zip(spans, crcs, strict=True):
        # Equal to TensorEntry(file, span.dtype, ...) at a third of the cost: a frozen dataclass's
        # __init__ sets each of its eight fields through object.__setattr__.
        entry = _new(TensorEntry)
        entry.__dict__.update(file=file, dtype=span.dtype, shape=span.shape, begin=span.begin, end=span.end,
                              crc32c=crc, block_bytes=0, block_crc32c=())
        entries[span.name] = entry
    return entries


_new = object.__new__


@dataclass(frozen=True)
class ShardEntry:
    """One stored piece of a sharded tensor: the tensor holding it, and where it sits in the whole."""

    tensor: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardedTensor:
    """A tensor saved as shards (a DTensor): its global dtype and shape, how it was laid out when
    saved (informational: a reader only needs the shards' offsets), and the shards."""

    dtype: str
    shape: tuple[int, ...]
    shards: tuple[ShardEntry, ...]
    placements: tuple[str, ...] = ()
    mesh: tuple[int, ...] = ()


@dataclass
class Manifest:
    step: int
    created: float
    world_size: int
    versions: dict[str, str]
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    state: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: Any = None
    format_version: str = FORMAT_VERSION
    sharded: dict[str, ShardedTensor] = field(default_factory=dict)
    rank_state: list[dict[str, Any]] | None = None
    """Per-rank state entries of a checkpoint saved by several ranks (index: rank); None otherwise."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME, "format_version": self.format_version, "step": self.step,
            "created": self.created, "world_size": self.world_size, "versions": self.versions,
            "checksum": CHECKSUM, "metrics": self.metrics, "metadata": self.metadata,
            "files": {n: {"size": f.size, "header_crc32c": f.header_crc32c} for n, f in self.files.items()},
            "state": self.state,
        }
        if self.rank_state is not None:
            doc["rank_state"] = self.rank_state
        # allow_nan=False: the manifest is strict JSON that any tool parses; non-finite floats are
        # tagged by the codec before they get here.
        head = json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        # The tensor table (one entry per tensor, often tens of thousands) is written as text:
        # building it as dicts made the garbage collector walk the whole training process.
        tensors = _tensor_table(self.tensors)
        body = head[:-1] + ',"tensors":{' + tensors + "}"
        if self.sharded:
            body += ',"sharded":{' + ",".join(_sharded_json(n, t) for n, t in self.sharded.items()) + "}"
        return seal(body.encode("utf-8"))

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parse and validate a manifest read from an untrusted file."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} cap")
        if not raw.strip():
            raise CorruptCheckpointError(f"{where}: manifest is empty (the save was interrupted before commit)")
        sealed = _check_seal(raw, where)
        _check_structure(raw, where)
        try:
            with paused_gc():
                doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from None
        with paused_gc():
            manifest = _parse(doc, where)
        if not sealed and int(manifest.format_version.split(".")[1]) >= _SEALED_SINCE_MINOR:
            raise CorruptCheckpointError(f"{where}: the manifest's own checksum (manifest_crc32c, last member) is "
                                         "missing: the file was edited or damaged")
        return manifest


def _tensor_table(tensors: dict[str, TensorEntry]) -> str:
    """The members of the ``tensors`` object, as ``json.dumps`` would write them (``_quoted`` is
    ``json.dumps(s, ensure_ascii=False)`` without its per-call set-up; a shape's text is made once)."""
    files: dict[str, str] = {}
    shapes: dict[tuple[int, ...], str] = {}
    rows = []
    for name, t in tensors.items():
        file = files.get(t.file)
        if file is None:
            file = files[t.file] = encode_basestring_ascii(t.file)
        shape = shapes.get(t.shape)
        if shape is None:
            shape = shapes[t.shape] = _ints(t.shape)
        rows.append(f'{_quoted(name)}:{{"file":{file},"dtype":"{t.dtype}","shape":{shape},'
                    f'"offsets":[{t.begin},{t.end}],"crc32c":{t.crc32c}{_blocks_json(t) if t.block_bytes else ""}}}')
    return ",".join(rows)


def _ints(values: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def _blocks_json(entry: TensorEntry) -> str:
    if not entry.block_bytes:
        return ""
    return f',"block_bytes":{entry.block_bytes},"block_crc32c":{_ints(entry.block_crc32c)}'


def _sharded_json(name: str, tensor: ShardedTensor) -> str:
    shards = ",".join(f'{{"tensor":{json.dumps(s.tensor, ensure_ascii=False)},"offsets":{_ints(s.offsets)},'
                      f'"shape":{_ints(s.shape)}}}' for s in tensor.shards)
    return (f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{tensor.dtype}","shape":{_ints(tensor.shape)},'
            f'"placements":{json.dumps(list(tensor.placements))},"mesh":{_ints(tensor.mesh)},"shards":[{shards}]}}')


def seal(body: bytes) -> bytes:
    """Close an unterminated JSON object ``body`` with its checksum member (see the module docstring)."""
    return body + b',"manifest_crc32c":' + str(crc32c(body)).encode() + b"}"


def _check_seal(raw: bytes, where: str) -> bool:
    """True if the manifest ends with a matching checksum; raise if it ends with a wrong one."""
    match = _SEAL.search(raw, max(0, len(raw) - 64))  # the member is at the very end
    if match is None:
        return False
    expected, found = int(match.group(1)), crc32c(raw[:match.start()])
    if expected != found:
        raise CorruptCheckpointError(f"{where}: manifest checksum mismatch (recorded {expected:#010x}, computed "
                                     f"{found:#010x}): the manifest was damaged or edited; this checkpoint is "
                                     "not used")
    return True


def _containers(raw: bytes) -> int:
    """The number of JSON arrays and objects in ``raw``, exact when it matters (above the cap)."""
    upper = raw.count(b"[") + raw.count(b"{")  # an upper bound: brackets inside strings counted too
    if upper <= MAX_MANIFEST_CONTAINERS:
        return upper
    bare = _STRING.sub(b'""', raw)  # brackets inside strings are not containers
    return bare.count(b"[") + bare.count(b"{")


def unreadable(raw: bytes) -> str | None:
    """Why every reader would refuse the manifest ``raw`` (its caps), None when they accept it: a writer
    checks before committing, so that no committed checkpoint is one that cannot be loaded."""
    fix = ("no reader could load it, so it is not committed. Fix: fewer, larger tensors or shards (shard each "
           "tensor over fewer ranks, e.g. HSDP; fewer, larger parameters); a manifest split over several files "
           "is future work")
    if len(raw) > MAX_MANIFEST_BYTES:
        return (f"the manifest would be {len(raw):,} bytes, over the {MAX_MANIFEST_BYTES:,} that readers accept "
                f"(MAX_MANIFEST_BYTES): {fix}")
    count = _containers(raw)
    if count > MAX_MANIFEST_CONTAINERS:
        return (f"the manifest would hold {count:,} JSON arrays and objects, over the {MAX_MANIFEST_CONTAINERS:,} "
                f"that readers accept (MAX_MANIFEST_CONTAINERS, a few per tensor or shard): {fix}")
    return None


def _check_structure(raw: bytes, where: str) -> None:
    """Refuse, before parsing, a manifest with more than MAX_MANIFEST_CONTAINERS arrays and objects."""
    count = _containers(raw)
    if count > MAX_MANIFEST_CONTAINERS:
        raise CorruptCheckpointError(f"{where}: manifest holds {count} JSON arrays and objects, over the cap of "
                                     f"{MAX_MANIFEST_CONTAINERS} (MAX_MANIFEST_CONTAINERS; a real checkpoint holds a "
                                     "few per tensor); refused before parsing it")


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{where}: not an unbroken manifest (missing \"format\": \"{FORMAT_NAME}\")")
    _check_version(doc.get("format_version"), where)
    if doc.get("checksum") != CHECKSUM:
        raise CorruptCheckpointError(f"{where}: unknown checksum algorithm {doc.get('checksum')!r}")
    files = {check_file_name(n, where): _file_entry(e, n, where) for n, e in _get(doc, "files", dict, where).items()}
    tensors = {n: _tensor_entry(e, n, files, where) for n, e in _get(doc, "tensors", dict, where).items()}
    created = _get(doc, "created", (int, float), where)
    if not (isinstance(created, float) and math.isfinite(created)) and not (isinstance(created, int)
                                                                        and abs(created) < 2**53):
        raise CorruptCheckpointError(f"{where}: 'created' is not a finite time")
    metrics = doc.get("metrics", {})
    if not isinstance(metrics, dict):
        raise CorruptCheckpointError(f"{where}: 'metrics' must be an object")
    world_size = _count(doc.get("world_size"), "world_size", where)
    sharded_doc = doc.get("sharded", {})
    if not isinstance(sharded_doc, dict):
        raise CorruptCheckpointError(f"{where}: 'sharded' must be an object")
    claimed: set[str] = set()
    sharded = {n: _sharded_entry(e, n, tensors, claimed, where) for n, e in sharded_doc.items()}
    return Manifest(
        step=_count(doc.get("step"), "step", where), created=float(created),
        world_size=world_size,
        versions={str(k): str(v) for k, v in _get(doc, "versions", dict, where).items()},
        files=files, tensors=tensors, state=_get(doc, "state", dict, where),
        metrics=metrics, metadata=doc.get("metadata"), format_version=doc["format_version"],
        sharded=sharded, rank_state=_rank_state(doc.get("rank_state"), world_size, where),
    )


def _check_version(version: Any, where: str) -> None:
    match = _VERSION.match(version) if isinstance(version, str) else None
    if match is None:
        raise CorruptCheckpointError(f"{where}: invalid format_version {version!r} (expected MAJOR.MINOR)")
    if int(match.group(1)) != int(FORMAT_VERSION.split(".")[0]):
        raise UnsupportedFormatError(
            f"{where}: format version {version} is not supported by this unbroken (reads {FORMAT_VERSION}); "
            "upgrade unbroken to read it"
        )


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptCheckpointError(f"{where}: manifest field {key!r} is missing or has the wrong type")
    return value


def _count(value: Any, what: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CorruptCheckpointError(f"{where}: {what} must be a non-negative integer, got {value!r}")
    return value


def _file_entry(entry: Any, name: str, where: str) -> FileEntry:
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{where}: file entry {name!r} is not an object")
    return FileEntry(_count(entry.get("size"), f"size of {name}", where),
                     _count(entry.get("header_crc32c"), f"header_crc32c of {name}", where))


def _tensor_entry(entry: Any, name: str, files: dict[str, FileEntry], where: str) -> TensorEntry:
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{where}: tensor entry {name!r} is not an object")
    file, dtype, shape, offsets = entry.get("file"), entry.get("dtype"), entry.get("shape"), entry.get("offsets")
    if not isinstance(file, str) or file not in files:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} refers to unlisted file {file!r}")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not isinstance(offsets, list) or len(offsets) != 2:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has a malformed shape or offsets")
    dims = tuple(_count(d, f"shape of {name}", where) for d in shape)
    begin, end = (_count(o, f"offsets of {name}", where) for o in offsets)
    # Sizes a reader allocates are derived from the shape: it must agree with the bytes stored (whose
    # place in the file is checked against the file's own header before any of them is read).
    if end - begin != math.prod(dims) * ITEMSIZES[dtype]:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} is {dtype}{list(dims)}, "
                                     f"{math.prod(dims) * ITEMSIZES[dtype]} bytes, but its offsets [{begin}, {end}) "
                                     f"hold {end - begin}")
    crc = _count(entry.get("crc32c"), f"crc32c of {name}", where)
    block_bytes, blocks = _blocks(entry, name, end - begin, where)
    return TensorEntry(file, dtype, dims, begin, end, crc, block_bytes, blocks)


def _blocks(entry: dict[str, Any], name: str, nbytes: int, where: str) -> tuple[int, tuple[int, ...]]:
    if "block_bytes" not in entry and "block_crc32c" not in entry:
        return 0, ()
    size, crcs = entry.get("block_bytes"), entry.get("block_crc32c")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or not isinstance(crcs, list):
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has malformed block checksums")
    if nbytes < 0 or len(crcs) != -(-nbytes // size) or len(crcs) > MAX_BLOCKS:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has {len(crcs)} block checksums for {nbytes} "
                                     f"bytes in blocks of {size}")
    return size, tuple(_count(c, f"block crc32c of {name}", where) for c in crcs)


def _sharded_entry(entry: Any, name: str, tensors: dict[str, TensorEntry], claimed: set[str],
                   where: str) -> ShardedTensor:
    """A sharded tensor: every shard must be a listed tensor of the same dtype, inside the whole, stored
    for no other shard (``claimed``: those seen so far), and the shards must cover the whole exactly
    once.  So the whole is never larger than the bytes stored for it: a reader may allocate it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
        raise CorruptCheckpointError(f"{where}: sharded tensor {name!r} is malformed")
    if name in tensors:
        raise CorruptCheckpointError(f"{where}: {name!r} is both a tensor and a sharded tensor")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES or not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CorruptCheckpointError(f"{where}: sharded tensor {name!r} has a bad dtype or shape")
    dims = tuple(_count(d, f"shape of {name}", where) for d in shape)
    shards = tuple(_shard(s, name, dtype, dims, tensors, where) for s in entry["shards"])
    problem = cover_problem([(s.offsets, s.shape) for s in shards], ((0,) * len(dims), dims))
    if problem is not None:
        raise CorruptCheckpointError(f"{where}: the shards of {name!r} {dtype}{list(dims)} do not cover it exactly "
                                     f"once: {problem}")
    for shard in shards:
        if shard.tensor in claimed:
            raise CorruptCheckpointError(f"{where}: tensor {shard.tensor!r} is stored for two shards "
                                         f"(the second in {name!r}); each shard is stored once")
        claimed.add(shard.tensor)
    placements, mesh = entry.get("placements", []), entry.get("mesh", [])
    if not (isinstance(placements, list) and all(isinstance(p, str) for p in placements) and isinstance(mesh, list)):
        raise CorruptCheckpointError(f"{where}: sharded tensor {name!r} has malformed placements or mesh")
    return ShardedTensor(dtype, dims, shards, tuple(placements), tuple(_count(m, "mesh", where) for m in mesh))


def _shard(shard: Any, name: str, dtype: str, dims: tuple[int, ...], tensors: dict[str, TensorEntry],
           where: str) -> ShardEntry:
    if not isinstance(shard, dict) or not isinstance(shard.get("offsets"), list) or not isinstance(
            shard.get("shape"), list):
        raise CorruptCheckpointError(f"{where}: a shard of {name!r} is malformed")
    tensor = shard.get("tensor")
    offsets = tuple(_count(o, f"shard offsets of {name}", where) for o in shard["offsets"])
    shape = tuple(_count(d, f"shard shape of {name}", where) for d in shard["shape"])
    stored = tensors.get(tensor) if isinstance(tensor, str) else None
    if not isinstance(tensor, str) or stored is None or stored.dtype != dtype or stored.shape != shape:
        raise CorruptCheckpointError(f"{where}: a shard of {name!r} refers to {tensor!r}, which is not a listed "
                                     f"{dtype}{list(shape)} tensor")
    if len(offsets) != len(dims) or len(shape) != len(dims) or any(
            o + n > d for o, n, d in zip(offsets, shape, dims)):
        raise CorruptCheckpointError(f"{where}: shard {tensor!r} at {list(offsets)} of shape {list(shape)} lies "
                                     f"outside {name!r} of shape {list(dims)}")
    return ShardEntry(tensor, offsets, shape)


def _rank_state(value: Any, world_size: int, where: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != world_size or not all(isinstance(v, dict) for v in value):
        raise CorruptCheckpointError(f"{where}: 'rank_state' must hold one object per rank ({world_size})")
    return value
