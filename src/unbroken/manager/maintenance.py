"""Looking after a run outside training: prune it by retention rules, quarantine its corrupt
checkpoints, copy its checkpoints elsewhere.

Both work on local paths and URLs.  Pruning a local run takes its run lock, so it never runs under
a live manager (which applies its own retention).  A copy is committed at the destination like a
save (manifest last) and verified; steps the destination already has are not copied again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint.listing import CheckpointRecord, check_named_step, scan, with_newest_verified
from ..checkpoint.target import no_step
from ..checkpoint.transfer import CopyResult, copy_checkpoint
from ..errors import CorruptCheckpointError, is_damage
from ..io import verify_checkpoint
from ..storage import LocalStorage, Storage, is_url, step_name
from ..storage.base import parse_quarantine_name
from ..storage.paths import open_run, quarantined_names
from .quarantine import quarantine
from .retention import RetentionPolicy, expired, policies_from
from .runlock import run_locked

__all__ = ["PruneResult", "prune", "quarantine_corrupt", "copy_checkpoints"]


@dataclass(frozen=True)
class PruneResult:
    deleted: list[CheckpointRecord]
    kept: list[CheckpointRecord]
    failed: list[tuple[CheckpointRecord, str]]
    removed_partial: list[str]
    removed_quarantined: list[str] = field(default_factory=list)


def prune(run_dir: str | os.PathLike[str], *, keep_last: int | None = None, keep_best: int | None = None,
          best_metric: str | None = None, best_mode: str = "min", keep_every: int | None = None,
          invalid: bool = False, dry_run: bool = False, storage_options: dict[str, Any] | None = None
          ) -> PruneResult:
    """Delete the checkpoints no rule keeps (the newest valid one always stays, and is first checked
    byte by byte), and with ``invalid`` those that fail validation and those quarantined as corrupt;
    abandoned partial saves are removed.  ``dry_run`` deletes nothing."""
    policies = policies_from(keep_last=keep_last, keep_best=keep_best, best_metric=best_metric, best_mode=best_mode,
                             keep_every=keep_every)
    if not policies and not invalid:
        raise ValueError("prune needs a rule (keep_last, keep_best, keep_every) or invalid=True")
    storage = open_run(run_dir, storage_options)
    with run_locked(storage):
        return _prune(storage, policies, invalid, dry_run)


def _prune(storage: Storage, policies: list[RetentionPolicy], invalid: bool, dry_run: bool) -> PruneResult:
    # Manifests alone would count a checkpoint with a flipped data bit as the newest valid one, and
    # keep_last=1 would then delete the only good one: the one kept as newest is read in full first.
    records = with_newest_verified(storage, scan(storage)) if policies else scan(storage)
    doomed = expired(records, policies) if policies else []
    doomed += [r for r in records if not r.valid] if invalid else []
    deleted, failed = [], []
    for record in sorted(doomed, key=lambda r: r.step):
        try:
            if not dry_run:
                storage.delete(step_name(record.step))
            deleted.append(record)
        except OSError as exc:
            failed.append((record, str(exc)))
    quarantined = _remove_quarantined(storage, dry_run, failed) if invalid else []
    removed = [] if dry_run else storage.cleanup()
    kept = [r for r in records if r not in doomed]
    return PruneResult(deleted, kept, failed, removed, quarantined)


def _remove_quarantined(storage: Storage, dry_run: bool, failed: list[tuple[CheckpointRecord, str]]) -> list[str]:
    removed = []
    for name in quarantined_names(storage):
        try:
            if not dry_run:
                storage.delete(name)
            removed.append(name)
        except OSError as exc:
            parsed = parse_quarantine_name(name)
            record = CheckpointRecord(parsed[0] if parsed else 0, f"{storage.url}/{name}", valid=False,
                                      problem="quarantined")
            failed.append((record, str(exc)))
    return removed


def quarantine_corrupt(run_dir: str | os.PathLike[str], steps: Iterable[int] | None = None, *,
                       storage_options: dict[str, Any] | None = None) -> list[tuple[int, str, str]]:
    """Verify every checkpoint of the run (or only ``steps``) and quarantine those found corrupt, as
    restore() does: moved to ``corrupt-step_N-<time>-<id>``, never restored or counted again, their
    steps free to be saved anew.  Takes the run lock (never under a live manager).  A newer format or
    a checkpoint that cannot be read just now is left alone.  Returns (step, new name, problem) each."""
    storage = open_run(run_dir, storage_options)
    wanted = set(steps) if steps is not None else None
    moved = []
    with run_locked(storage):
        for record in scan(storage):
            if wanted is not None and record.step not in wanted:
                continue
            name = step_name(record.step)
            try:
                check_named_step(storage, name, verify_checkpoint(storage, name))
            except CorruptCheckpointError as exc:
                new_name = quarantine(storage, name, exc) if is_damage(exc) else None
                if new_name is not None:
                    moved.append((record.step, new_name, str(exc)))
    return moved


def copy_checkpoints(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, step: int | None = None,
                     latest: bool = False, storage_options: dict[str, Any] | None = None,
                     progress: Callable[[str, int], Callable[[int], None] | None] | None = None
                     ) -> list[CopyResult]:
    """Copy the valid checkpoints of run ``src`` (or only ``step``, or only the newest) into run ``dst``.

    ``storage_options`` apply to whichever side is a URL.  ``progress(name, total_bytes)`` may return a
    callback that receives the bytes copied; it is called when a checkpoint's first bytes move, so never
    for a step ``dst`` already has.  A ``step`` that ``src`` does not have (or has, but not valid)
    raises :class:`CheckpointNotFoundError` (:class:`CorruptCheckpointError`) naming the steps there.
    Raises on the first failed copy; what was committed before it stays committed.
    """
    source = open_run(src, storage_options if is_url(src) else None)
    records = _to_copy(source, step, latest)
    dest = open_run(dst, storage_options if is_url(dst) else None, create=True)
    results = []
    for record in records:
        name = step_name(record.step)
        advance = _on_first_bytes(progress, name, record.size) if progress is not None else None
        # A local source is verified before upload; a remote one is verified where it lands.
        results.append(copy_checkpoint(source, dest, name, verify_source=isinstance(source, LocalStorage),
                                       progress=advance))
    return results


def _to_copy(source: Storage, step: int | None, latest: bool) -> list[CheckpointRecord]:
    records = scan(source)
    valid = [r for r in records if r.valid]
    if step is None:
        return valid[-1:] if latest else valid
    for record in records:
        if record.step == step and not record.valid:
            raise CorruptCheckpointError(f"{source.url}: step {step} is not valid, not copied: {record.problem}")
    chosen = [r for r in valid if r.step == step]
    if not chosen:
        raise no_step(source.url, step, [r.step for r in records])
    return chosen


def _on_first_bytes(progress: Callable[[str, int], Callable[[int], None] | None], name: str, total: int
                    ) -> Callable[[int], None]:
    """A bytes callback that asks ``progress`` for the real one when the first bytes arrive."""
    advance: list[Callable[[int], None] | None] = []

    def moved(n: int) -> None:
        if not advance:
            advance.append(progress(name, total))
        callback = advance[0]
        if callback is not None:
            callback(n)
    return moved
