"""Listing the checkpoints of a run directory: one :class:`CheckpointRecord` each."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import CorruptCheckpointError
from ..format import Manifest
from ..format.values import decode
from ..io import read_manifest, verify_checkpoint
from ..storage import Storage, parse_step_name, step_name
from ..storage.base import parse_quarantine_name
from ..storage.paths import quarantined_names

__all__ = ["CheckpointRecord", "scan", "record_of", "check_named_step", "with_newest_verified",
           "scan_quarantined"]


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
    #: Moved out of the run's checkpoints as corrupt (``path`` is its ``corrupt-step_N-...`` directory):
    #: never restored or counted by retention, kept for inspection, removed by ``prune --invalid``.
    quarantined: bool = False


def record_of(storage: Storage, name: str, manifest: Manifest) -> CheckpointRecord:
    return CheckpointRecord(step=manifest.step, path=f"{storage.url}/{name}", created=manifest.created,
                            size=manifest.total_bytes, metrics=decode_metrics(manifest.metrics))


def check_named_step(storage: Storage, name: str, manifest: Manifest) -> None:
    """Raise :class:`CorruptCheckpointError` when ``name`` is a step name for another step than the manifest's."""
    named = parse_step_name(name)
    if named is not None and named != manifest.step:
        raise CorruptCheckpointError(f"{storage.url}/{name}: the directory is named for step {named} but its "
                                     f"manifest says step {manifest.step}; it was not written by this run's "
                                     "manager (e.g. unbroken.save into a step_* path). Fix: rename or remove it")


def decode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    def no_tensor(_name: str) -> Any:
        raise CorruptCheckpointError("metrics must not refer to tensors")

    return {k: decode(v, no_tensor) for k, v in metrics.items()}


def with_newest_verified(storage: Storage, records: list[CheckpointRecord]) -> list[CheckpointRecord]:
    """``records`` (oldest first, as :func:`scan` gives them) after checking every byte of the newest
    valid one, and of the one before it when that fails, and so on: each that fails is marked invalid.

    Retention always keeps the newest valid checkpoint; this makes it one a restore would really use,
    for the price of reading one checkpoint.  A checkpoint that cannot be read now (an I/O error)
    raises: nothing may be decided on a guess.
    """
    checked = list(records)
    for index in reversed(range(len(checked))):
        record = checked[index]
        if not record.valid:
            continue
        name = step_name(record.step)
        try:
            check_named_step(storage, name, verify_checkpoint(storage, name))
            break
        except CorruptCheckpointError as exc:
            checked[index] = replace(record, valid=False, problem=str(exc))
    return checked


def scan_quarantined(storage: Storage) -> list[CheckpointRecord]:
    """The run's quarantined checkpoints, oldest step first (``created`` is when each was quarantined)."""
    records = []
    for name in quarantined_names(storage):
        parsed = parse_quarantine_name(name)
        if parsed is None:
            continue  # not a name we made: leave it alone
        step, when = parsed
        records.append(CheckpointRecord(step=step, path=f"{storage.url}/{name}", created=when, valid=False,
                                        problem="quarantined as corrupt: kept for inspection, never restored; "
                                                "remove with unbroken prune --invalid", quarantined=True))
    return sorted(records, key=lambda r: (r.step, r.created or 0.0))


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
            check_named_step(storage, name, manifest)
            records.append(record_of(storage, name, manifest))
        except (CorruptCheckpointError, OSError) as exc:
            records.append(CheckpointRecord(step=step, path=f"{storage.url}/{name}", valid=False, problem=str(exc)))
    return sorted(records, key=lambda r: r.step)
