"""What a :class:`~unbroken.CheckpointManager` does differently under torch.distributed.

The manager asks :func:`attach` once; None means a single process (torch.distributed not
initialised, or one rank) and nothing changes.  Otherwise every rank holds a
:class:`DistributedRun` and the manager delegates to it: saves go through
:class:`~.saver.DistributedSaver`, restores through :func:`~.resume.restore_by_ranks`, and only the
coordinator (rank 0) locks the run directory and applies retention.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import Any

from ..format import Manifest
from ..schedule import SaveSchedule
from ..storage import Storage
from .resume import restore_by_ranks
from .saver import DistributedSaver
from .sources import BroadcastSource, DirectSource, Source
from .world import DEFAULT_TIMEOUT_S, World

__all__ = ["DistributedRun", "attach", "RESTORE_MODES"]

RESTORE_MODES = ("direct", "broadcast")


class DistributedRun:
    def __init__(self, world: World, restore_mode: str = "direct") -> None:
        if restore_mode not in RESTORE_MODES:
            raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {restore_mode!r}")
        self.world, self.restore_mode = world, restore_mode
        self.last_source: Source | None = None

    @property
    def is_coordinator(self) -> bool:
        return self.world.is_coordinator

    def saver(self, storage: Storage, background: bool, budget_bytes: int | None,
              on_commit: Callable[[Manifest], None]) -> DistributedSaver:
        return DistributedSaver(self.world, storage, background, budget_bytes, on_commit)

    def source(self) -> Source:
        return BroadcastSource(self.world.control) if self.restore_mode == "broadcast" else DirectSource()

    def restore(self, storage: Storage, state: MutableMapping[str, Any], strict: bool, rng: bool,
                step: int | None = None, path: str | os.PathLike[str] | None = None) -> Manifest | None:
        """Collective: every rank restores the same checkpoint (see :mod:`.resume`)."""
        self.last_source = self.source()
        return restore_by_ranks(self.world, storage, self.last_source, state, strict, rng, step=step, path=path)

    def schedule(self, schedule: SaveSchedule) -> SaveSchedule:
        """``schedule`` whose time-based decisions every rank takes together (clocks differ)."""
        return _AgreedSchedule(self.world, schedule) if schedule.every_minutes is not None else schedule


class _AgreedSchedule(SaveSchedule):
    """A save is due on every rank when it is due on some rank (one small all-reduce per step)."""

    def __init__(self, world: World, inner: SaveSchedule) -> None:
        super().__init__(inner.every_steps, inner.every_minutes)
        self._world = world

    def due(self, step: int) -> bool:
        return self._world.control.any_true(super().due(step))


def attach(restore_mode: str = "direct", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedRun | None:
    """The distributed role of a new manager, or None for a single process (collective otherwise)."""
    if restore_mode not in RESTORE_MODES:
        raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {restore_mode!r}")
    world = World.detect(timeout_s)
    return None if world is None else DistributedRun(world, restore_mode)
