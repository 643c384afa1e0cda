"""What :func:`unbroken.diff` finds: frozen records, and their plain-JSON form (docs/DIFF.md).

Names are paths from the top of the checkpoint: ``model/layer.weight``, ``optimizer/state/0/exp_avg``,
``metrics/loss``, ``metadata/config/lr``; a per-rank entry of a checkpoint saved by several ranks is
``rng (rank 1)``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Side", "TensorDifference", "Change", "ValueDifference", "EntryDiff", "CheckpointDiff", "plain"]


@dataclass(frozen=True)
class Side:
    """One of the two checkpoints compared."""

    path: str
    step: int
    world_size: int


@dataclass(frozen=True)
class TensorDifference:
    """A tensor whose dtype and shape agree but whose values differ."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    elements: int
    differing: int
    """How many elements differ (bitwise, or beyond ``atol``)."""
    max_abs: float | None
    """Largest ``|a - b|`` (NaN when a NaN is on one side only); None when torch cannot widen the dtype."""
    max_rel: float | None
    """Largest ``|a - b| / max(|b|, tiny)``, ``tiny`` the dtype's smallest positive normal (1 for integers)."""


@dataclass(frozen=True)
class Change:
    """The same name holds something of another kind: another dtype or shape (``F32[3, 4]`` ->
    ``BF16[3, 4]``), a tensor on one side and a value on the other, another container type, or an
    entry of another kind (``module`` -> ``stateful``).  Values are not compared."""

    name: str
    a: str
    b: str


@dataclass(frozen=True)
class ValueDifference:
    """A plain (non-tensor) value that differs; ``a`` and ``b`` are the values as decoded."""

    name: str
    a: Any
    b: Any


@dataclass(frozen=True)
class EntryDiff:
    """One state entry (or the metrics, or the metadata) present in both checkpoints."""

    name: str
    kind_a: str | None = None
    kind_b: str | None = None
    identical_tensors: tuple[str, ...] = ()
    differing_tensors: tuple[TensorDifference, ...] = ()
    changed: tuple[Change, ...] = ()
    values: tuple[ValueDifference, ...] = ()
    equal_values: int = 0
    only_a: tuple[str, ...] = ()
    """Names (tensors or values) in A's entry and not in B's."""
    only_b: tuple[str, ...] = ()

    @property
    def identical(self) -> bool:
        return (self.kind_a == self.kind_b and not self.differing_tensors and not self.changed and not self.values
                and not self.only_a and not self.only_b)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "identical": self.identical, "kind_a": self.kind_a, "kind_b": self.kind_b,
                "identical_tensors": list(self.identical_tensors),
                "differing_tensors": [_tensor_json(t) for t in self.differing_tensors],
                "changed": [{"name": c.name, "a": c.a, "b": c.b} for c in self.changed],
                "values": [{"name": v.name, "a": plain(v.a), "b": plain(v.b)} for v in self.values],
                "equal_values": self.equal_values, "only_a": list(self.only_a), "only_b": list(self.only_b)}


@dataclass(frozen=True)
class CheckpointDiff:
    """Everything that differs between checkpoints A and B (``unbroken.diff``)."""

    a: Side
    b: Side
    atol: float
    checkpoint: tuple[ValueDifference, ...] = ()
    """Differences of the checkpoint itself: ``step`` and ``world_size`` (creation time, versions and
    file layout are not compared)."""
    entries: tuple[EntryDiff, ...] = ()
    """The state entries both checkpoints hold, in A's order."""
    only_a: tuple[str, ...] = ()
    """State entries only A holds."""
    only_b: tuple[str, ...] = ()
    metrics: EntryDiff = field(default_factory=lambda: EntryDiff("metrics"))
    metadata: EntryDiff = field(default_factory=lambda: EntryDiff("metadata"))

    @property
    def identical(self) -> bool:
        return (not self.checkpoint and not self.only_a and not self.only_b and self.metrics.identical
                and self.metadata.identical and all(e.identical for e in self.entries))

    def counts(self) -> dict[str, int]:
        """Totals over every entry, the metrics and the metadata (the CLI's summary line)."""
        parts = (*self.entries, self.metrics, self.metadata)
        return {"identical_tensors": sum(len(e.identical_tensors) for e in parts),
                "differing_tensors": sum(len(e.differing_tensors) for e in parts),
                "changed": sum(len(e.changed) + (e.kind_a != e.kind_b) for e in parts),
                "differing_values": sum(len(e.values) for e in parts) + len(self.checkpoint),
                "equal_values": sum(e.equal_values for e in parts),
                "only_a": sum(len(e.only_a) for e in parts) + len(self.only_a),
                "only_b": sum(len(e.only_b) for e in parts) + len(self.only_b)}

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``json.dumps`` (strict JSON: non-finite floats become "nan", "inf", "-inf")."""
        return {"identical": self.identical, "atol": self.atol, "a": _side_json(self.a), "b": _side_json(self.b),
                "checkpoint": [{"name": v.name, "a": plain(v.a), "b": plain(v.b)} for v in self.checkpoint],
                "entries": [e.to_json() for e in self.entries], "only_a": list(self.only_a),
                "only_b": list(self.only_b), "metrics": self.metrics.to_json(),
                "metadata": self.metadata.to_json(), "counts": self.counts()}


def _side_json(side: Side) -> dict[str, Any]:
    return {"path": side.path, "step": side.step, "world_size": side.world_size}


def _tensor_json(t: TensorDifference) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "elements": t.elements,
            "differing": t.differing, "max_abs": plain(t.max_abs), "max_rel": plain(t.max_rel)}


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as strict JSON: numbers stay numbers, a non-finite float is "nan", "inf" or "-inf",
    tuples become lists, dict keys strings, NumPy scalars their number; anything else its ``repr``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                          "inf" if value > 0 else "-inf")
    if depth < 64 and isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if depth < 64 and isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if depth < 64 and isinstance(value, argparse.Namespace):
        return plain(vars(value), depth + 1)
    item = getattr(value, "item", None)  # a NumPy scalar
    if callable(item) and type(value).__module__ == "numpy":
        return plain(item(), depth + 1)
    return repr(value)
