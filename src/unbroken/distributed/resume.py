"""Resuming under torch.distributed: every rank restores the same checkpoint, or none does.

Rank 0 lists the run (and removes abandoned staging areas) and broadcasts the candidates, newest
first.  For each, every rank reads and verifies what it needs; the ranks then agree: if any rank
found the checkpoint corrupt or missing, every rank skips it (with a warning naming the rank and
the problem) and tries the previous one, so no two ranks ever resume from different steps.  A
checkpoint that does not fit the live objects, or any other failure, raises on every rank.
Each rank issues the same collectives whatever fails locally; a rank that died makes the others
fail within the group's timeout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .._internal.warn import warn
from ..errors import (
    CheckpointNotFoundError,
    CheckpointSkippedWarning,
    CorruptCheckpointError,
    DistributedError,
    StateMismatchError,
    is_damage,
)
from ..format import Manifest
from ..storage import Storage, parse_step_name, step_name
from ..storage.paths import committed_steps, split_checkpoint_path
from .load import LoadPlan, apply, build_tensors, plan_load
from .sources import Source
from .world import World

__all__ = ["restore_by_ranks"]

log = logging.getLogger("unbroken")


def restore_by_ranks(world: World, storage: Storage, source: Source, state: MutableMapping[str, Any], strict: bool,
                     rng: bool, step: int | None = None, path: str | os.PathLike[str] | None = None,
                     on_corrupt: Callable[[str, CorruptCheckpointError], object] | None = None) -> Manifest | None:
    """Restore the newest valid checkpoint (or exactly ``step`` / ``path``) on every rank; None if none.

    ``on_corrupt(name, error)`` runs on the coordinator for each checkpoint of the run that the ranks
    skipped because some rank found it corrupt (the manager quarantines it), once every rank is done
    reading it."""
    explicit = step is not None or path is not None
    if path is not None:
        storage, names = _at_path(world, path)
    elif step is not None:
        names = _exactly(world, storage, step)
    else:
        names = _newest_first(world, storage)
    for name in names:
        manifest, corrupt = _attempt(world, storage, source, name, state, strict, rng, explicit)
        if manifest is not None:
            return manifest
        if corrupt is not None and on_corrupt is not None and world.is_coordinator:
            on_corrupt(name, corrupt)
    return None


def _at_path(world: World, path: str | os.PathLike[str]) -> tuple[Storage, list[str]]:
    found: Any = None
    try:
        storage, name = split_checkpoint_path(path)
    except CheckpointNotFoundError as exc:
        found = str(exc)
    problems = world.control.all_gather_json(found)
    for rank, problem in enumerate(problems):
        if problem is not None:
            raise CheckpointNotFoundError(f"rank {rank}: {problem}")
    return storage, [name]


def _exactly(world: World, storage: Storage, step: int) -> list[str]:
    name = step_name(step)
    listing = world.control.broadcast_json(
        None if not world.is_coordinator else (None if storage.exists(name) else committed_steps(storage)))
    if listing is not None:
        raise CheckpointNotFoundError(f"no checkpoint for step {step} in {storage.url}; available steps: "
                                      f"{listing or 'none'}")
    return [name]


def _newest_first(world: World, storage: Storage) -> list[str]:
    steps = None
    if world.is_coordinator:
        removed = storage.cleanup()  # no rank saves during a restore: every staging area is abandoned
        if removed:
            log.info("removed abandoned staging/trash areas: %s", ", ".join(removed))
        steps = committed_steps(storage)
    return [step_name(s) for s in reversed(world.control.broadcast_json(steps))]


def _attempt(world: World, storage: Storage, source: Source, name: str, state: MutableMapping[str, Any],
             strict: bool, rng: bool, explicit: bool) -> tuple[Manifest | None, CorruptCheckpointError | None]:
    """(the manifest restored on every rank, None) or (None, the corruption found, if that was why it was skipped)."""
    failure: Exception | None = None
    manifest: Manifest | None = None
    plan: LoadPlan | None = None
    tensors: dict[str, Any] = {}
    try:
        manifest = source.manifest(storage, name)  # collective in broadcast mode: the same outcome everywhere
        expected = parse_step_name(name)
        if expected is not None and manifest.step != expected and not explicit:
            raise CorruptCheckpointError(f"{storage.url}/{name}: manifest says step {manifest.step}")
        plan = plan_load(manifest, state, world.rank, world.size, strict)
    except Exception as exc:
        failure = exc
    if manifest is not None:
        try:
            data = source.fetch(storage, name, manifest, plan.needs if plan is not None else [])
            if plan is not None and failure is None:
                tensors = build_tensors(plan, manifest, data)
        except Exception as exc:
            failure = failure or exc
    skipped = _agree(world, failure, f"{storage.url}/{name}", explicit)
    if skipped is not None or manifest is None or plan is None:
        return None, skipped.damage if skipped is not None else None
    try:
        apply(plan, state, tensors, strict, rng, world.rank)
    except Exception as exc:
        failure = exc
    skipped = _agree(world, failure, f"{storage.url}/{name}", explicit)
    return (None, skipped.damage) if skipped is not None else (manifest, None)


def _kind(exc: Exception) -> str:
    if isinstance(exc, (CorruptCheckpointError, CheckpointNotFoundError)):
        return "skip"  # PartialRestoreError included: an older checkpoint overwrites every entry again
    return "mismatch" if isinstance(exc, StateMismatchError) else "error"


@dataclass(frozen=True)
class _Skip:
    """The ranks skip this checkpoint; ``damage`` is set when a rank found the checkpoint itself corrupt."""

    damage: CorruptCheckpointError | None


def _agree(world: World, failure: Exception | None, where: str, explicit: bool) -> _Skip | None:
    """Every rank's outcome: None to go on, or :class:`_Skip` on every rank; raises on every rank when
    a failure is not one to skip."""
    mine = None if failure is None else {"kind": _kind(failure), "error": f"{type(failure).__name__}: {failure}",
                                         "damage": is_damage(failure)}
    every = world.control.all_gather_json(mine)
    bad = [(rank, v) for rank, v in enumerate(every) if v is not None]
    if not bad:
        return None
    fatal = [(rank, v) for rank, v in bad if v["kind"] != "skip"] or (bad if explicit else [])
    if fatal:
        if failure is not None and (explicit or _kind(failure) != "skip"):
            raise failure
        rank, verdict = fatal[0]
        kind = {"mismatch": StateMismatchError, "skip": CorruptCheckpointError}.get(verdict["kind"], DistributedError)
        raise kind(f"{where}: rank {rank} could not restore it: {verdict['error']}")
    rank, verdict = bad[0]
    message = f"skipping checkpoint {where}: rank {rank}: {verdict['error']}"
    warn(message, CheckpointSkippedWarning)
    damaged = [(r, v) for r, v in bad if v["damage"]]
    if not damaged:
        return _Skip(None)
    return _Skip(CorruptCheckpointError(f"{where}: rank {damaged[0][0]}: {damaged[0][1]['error']}"))
