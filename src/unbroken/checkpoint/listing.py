"""Listing the checkpoints of a run directory: one :class:`CheckpointRecord` each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError
from ..format import Manifest
from ..format.values import decode
from ..io import read_manifest, verify_checkpoint
from ..storage import Storage, parse_step_name

__all__ = ["CheckpointRecord", "scan", "record_of"]


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint as ``list()`` and ``unbroken ls`` show it.  ``problem`` says why it is not valid."""

    step: int
    path: str
    created: float | None = None
    size: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    valid: bool = True
    problem: str | None = None


def record_of(storage: Storage, name: str, manifest: Manifest) -> CheckpointRecord:
    return CheckpointRecord(step=manifest.step, path=f"{storage.url}/{name}", created=manifest.created,
                            size=manifest.total_bytes, metrics=decode_metrics(manifest.metrics))


def decode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    def no_tensor(_name: str) -> Any:
        raise CorruptCheckpointError("metrics must not refer to tensors")

    return {k: decode(v, no_tensor) for k, v in metrics.items()}


def scan(storage: Storage, verify: bool = False) -> list[CheckpointRecord]:
    """Every ``step_*`` checkpoint, oldest first.  Without ``verify`` only manifests are validated
    (cheap); with it every byte is checked against its checksum."""
    records = []
    for name in storage.names():
        step = parse_step_name(name)
        if step is None:
            continue
        try:
            manifest = verify_checkpoint(storage, name) if verify else read_manifest(storage, name)
            if manifest.step != step:
                raise CorruptCheckpointError(f"{name}: manifest says step {manifest.step}")
            records.append(record_of(storage, name, manifest))
        except (CorruptCheckpointError, OSError) as exc:
            records.append(CheckpointRecord(step=step, path=f"{storage.url}/{name}", valid=False, problem=str(exc)))
    return sorted(records, key=lambda r: r.step)
