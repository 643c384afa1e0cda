"""``unbroken.diff``: what differs between two checkpoints, entry by entry (docs/DIFF.md).

The logical state is compared, not the files: the entries every rank shares (a sharded tensor
assembled whole from its pieces, whichever rank's file holds it), then each rank's own entries as
``NAME (rank R)``.  So a checkpoint compares equal to a copy saved with another file layout.

Tensors are read one pair at a time, each verified against its checksum, and dropped once compared:
memory holds one tensor of each side, never a whole checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint.listing import decode_metrics
from ..checkpoint.target import Target, find_checkpoint
from ..errors import CorruptCheckpointError
from ..format.values import Json, decode
from .compare import compare_tensors
from .diff_result import Change, CheckpointDiff, EntryDiff, Side, TensorDifference, ValueDifference
from .reading import TensorReader

__all__ = ["diff", "CheckpointDiff"]


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str], *, step_a: int | None = None,
         step_b: int | None = None, atol: float = 0.0, storage_options: dict[str, Any] | None = None
         ) -> CheckpointDiff:
    """Compare checkpoints ``a`` and ``b``.

    Each is a checkpoint directory, or a run directory (its newest checkpoint with a valid manifest,
    older ones skipped with a :class:`CheckpointSkippedWarning`, or ``step_a`` / ``step_b``), local or
    a URL (``storage_options`` go to fsspec).  A tensor that fails its checksum while compared raises:
    the walk over both checkpoints is not restarted on an older one.  ``atol == 0`` compares bitwise;
    ``atol > 0`` tolerates ``|a - b| <= atol`` in floating-point tensors and plain floats.  Raises
    :class:`CheckpointNotFoundError` for a missing source and :class:`CorruptCheckpointError` when a
    byte fails its checksum."""
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol={atol!r}: expected a finite number >= 0 (0 compares bitwise)")
    first = find_checkpoint(a, step_a, storage_options)
    second = find_checkpoint(b, step_b, storage_options)
    with TensorReader(first) as reader_a, TensorReader(second) as reader_b:
        return _Comparer(reader_a, reader_b, float(atol)).run()


@dataclass
class _Ref:
    """A tensor in a decoded state tree: its stored name, dtype and shape (bytes read on demand)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass
class _Found:
    identical: list[str] = field(default_factory=list)
    differing: list[TensorDifference] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    values: list[ValueDifference] = field(default_factory=list)
    equal_values: int = 0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    def freeze(self, name: str, kind_a: str | None = None, kind_b: str | None = None) -> EntryDiff:
        return EntryDiff(name, kind_a, kind_b, tuple(self.identical), tuple(self.differing), tuple(self.changed),
                         tuple(self.values), self.equal_values, tuple(self.only_a), tuple(self.only_b))


class _Comparer:
    def __init__(self, reader_a: TensorReader, reader_b: TensorReader, atol: float) -> None:
        self.a, self.b, self.atol = reader_a, reader_b, atol

    def run(self) -> CheckpointDiff:
        ma, mb = self.a.target.manifest, self.b.target.manifest
        entries_a, entries_b = _entries(self.a.target), _entries(self.b.target)
        header = [ValueDifference(n, x, y) for n, x, y in (("step", ma.step, mb.step),
                                                            ("world_size", ma.world_size, mb.world_size)) if x != y]
        compared = [self._entry(key, node, entries_b[key]) for key, node in entries_a.items() if key in entries_b]
        metrics, metadata = _Found(), _Found()
        self._walk("metrics", decode_metrics(ma.metrics), decode_metrics(mb.metrics), metrics)
        if ma.metadata is not None or mb.metadata is not None:
            self._walk("metadata", _plain(ma.metadata, self.a.target), _plain(mb.metadata, self.b.target),
                       metadata)
        return CheckpointDiff(
            _side(self.a.target), _side(self.b.target), self.atol, tuple(header), tuple(compared),
            tuple(k for k in entries_a if k not in entries_b), tuple(k for k in entries_b if k not in entries_a),
            metrics.freeze("metrics"), metadata.freeze("metadata"))

    def _entry(self, key: str, node_a: dict[str, Json], node_b: dict[str, Json]) -> EntryDiff:
        found = _Found()
        kind_a, kind_b = str(node_a.get("kind")), str(node_b.get("kind"))
        self._walk(key, self._tree(node_a.get("value"), self.a), self._tree(node_b.get("value"), self.b), found)
        if "meta" in node_a or "meta" in node_b:  # a module's per-submodule versions (state_dict()._metadata)
            self._walk(f"{key}/_metadata", self._tree(node_a.get("meta"), self.a),
                       self._tree(node_b.get("meta"), self.b), found)
        return found.freeze(key, kind_a, kind_b)

    @staticmethod
    def _tree(node: Json, reader: TensorReader) -> Any:
        return decode(node, lambda name: _Ref(name, *reader.spec(name)))

    def _walk(self, path: str, a: Any, b: Any, found: _Found) -> None:
        if isinstance(a, _Ref) and isinstance(b, _Ref):
            self._tensors(path, a, b, found)
        elif isinstance(a, _Ref) or isinstance(b, _Ref):
            found.changed.append(Change(path, _describe(a), _describe(b)))
        elif _mapping(a) is not None and type(a) is type(b):
            self._children(path, _mapping(a) or {}, _mapping(b) or {}, found)
        elif isinstance(a, (list, tuple)) and type(a) is type(b) and (_has_refs(a) or _has_refs(b)):
            self._children(path, dict(enumerate(a)), dict(enumerate(b)), found)
        elif _has_refs(a) or _has_refs(b):  # e.g. a list of tensors became a tuple: not compared inside
            found.changed.append(Change(path, _describe(a), _describe(b)))
        elif _same(a, b, self.atol):
            found.equal_values += 1
        else:
            found.values.append(ValueDifference(path, a, b))

    def _children(self, path: str, a: dict[Any, Any], b: dict[Any, Any], found: _Found) -> None:
        for key, value in a.items():
            child = f"{path}/{_key_text(key)}"
            if key in b:
                self._walk(child, value, b[key], found)
            else:
                found.only_a.append(child)
        found.only_b.extend(f"{path}/{_key_text(key)}" for key in b if key not in a)

    def _tensors(self, path: str, a: _Ref, b: _Ref, found: _Found) -> None:
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            found.changed.append(Change(path, a.describe(), b.describe()))
            return
        result = compare_tensors(self.a.read(a.name), self.b.read(b.name), self.atol)
        if result.differing == 0:
            found.identical.append(path)
        else:
            found.differing.append(TensorDifference(path, a.dtype, a.shape, result.elements, result.differing,
                                                    result.max_abs, result.max_rel))


def _entries(target: Target) -> dict[str, dict[str, Json]]:
    """The logical entries: shared ones by name, each rank's own as ``NAME (rank R)``."""
    manifest = target.manifest
    entries = {k: v for k, v in manifest.state.items() if isinstance(v, dict)}
    for rank, per_rank in enumerate(manifest.rank_state or []):
        entries.update({f"{k} (rank {rank})": v for k, v in per_rank.items() if isinstance(v, dict)})
    return entries


def _side(target: Target) -> Side:
    return Side(target.path, target.manifest.step, target.manifest.world_size)


def _plain(node: Json, target: Target) -> Any:
    def no_tensor(_name: str) -> Any:
        raise CorruptCheckpointError(f"{target.path}: the metadata refers to a tensor; metadata holds plain values")

    return decode(node, no_tensor)


def _mapping(value: Any) -> dict[Any, Any] | None:
    if isinstance(value, dict):
        return value
    return vars(value) if isinstance(value, argparse.Namespace) else None


def _has_refs(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _Ref):
        return True
    if depth > 64:
        return False
    mapping = _mapping(value)
    children = mapping.values() if mapping is not None else value if isinstance(value, (list, tuple)) else ()
    return any(_has_refs(v, depth + 1) for v in children)


def _same(a: Any, b: Any, atol: float, depth: int = 0) -> bool:
    """Plain values equal type for type (1, 1.0 and True differ; so do a list and a tuple); floats
    bitwise, or within ``atol`` when it is > 0 (NaN then equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if struct.pack("<d", a) == struct.pack("<d", b):
            return True
        return atol > 0 and (abs(a - b) <= atol or (math.isnan(a) and math.isnan(b)))
    if depth > 64:
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, atol, depth + 1) for x, y in zip(a, b, strict=True))
    mapping_a, mapping_b = _mapping(a), _mapping(b)
    if mapping_a is not None and mapping_b is not None:
        return mapping_a.keys() == mapping_b.keys() and all(_same(v, mapping_b[k], atol, depth + 1)
                                                            for k, v in mapping_a.items())
    if type(a).__module__ == "numpy":  # a NumPy scalar: its bytes (its dtype is part of its type)
        return bool(a.tobytes() == b.tobytes())
    return bool(a == b)


def _describe(value: Any) -> str:
    if isinstance(value, _Ref):
        return f"tensor {value.describe()}"
    return type(value).__name__


def _key_text(key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() > 64:
        return f"<int of {key.bit_length()} bits>"
    return str(key)
