"""What a :class:`~unbroken.CheckpointManager` does differently under torch.distributed.

The manager asks :func:`attach` once; None means a single process (torch.distributed not
initialised, or one rank) and nothing changes.  Otherwise every rank holds a
:class:`DistributedRun` and the manager delegates to it: saves go through
:class:`~.rank_saver.DistributedSaver`, restores through
:func:`~unbroken.distributed.resume.restore_by_ranks`, and only the coordinator (rank 0) locks the run
directory and applies retention.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping
from typing import Any

from ..distributed.resume import restore_by_ranks
from ..distributed.sources import BroadcastSource, DirectSource, Source
from ..distributed.world import DEFAULT_TIMEOUT_S, World
from ..errors import CorruptCheckpointError
from ..format import Manifest
from ..storage import Storage
from .rank_saver import DistributedSaver
from .schedule import SaveSchedule

__all__ = ["DistributedRun", "attach", "RESTORE_MODES"]

RESTORE_MODES = ("direct", "broadcast")

log = logging.getLogger("unbroken")


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
              on_commit: Callable[[Manifest], None], live: MutableMapping[str, Any] | None = None
              ) -> DistributedSaver:
        return DistributedSaver(self.world, storage, background, budget_bytes, on_commit, live)

    def source(self) -> Source:
        return BroadcastSource(self.world.control) if self.restore_mode == "broadcast" else DirectSource()

    def restore(self, storage: Storage, state: MutableMapping[str, Any], strict: bool, rng: bool,
                step: int | None = None, path: str | os.PathLike[str] | None = None,
                on_corrupt: Callable[[str, CorruptCheckpointError], object] | None = None) -> Manifest | None:
        """Collective: every rank restores the same checkpoint (see :mod:`unbroken.distributed.resume`);
        ``on_corrupt`` runs on the coordinator for each checkpoint skipped as corrupt."""
        self.last_source = self.source()
        return restore_by_ranks(self.world, storage, self.last_source, state, strict, rng, step=step, path=path,
                                on_corrupt=on_corrupt)

    def schedule(self, schedule: SaveSchedule) -> SaveSchedule:
        """``schedule`` whose time-based decisions every rank takes together (clocks differ)."""
        agreed = schedule.every_minutes is not None or schedule.auto is not None
        return _AgreedSchedule(self.world, schedule) if agreed else schedule


class _AgreedSchedule(SaveSchedule):
    """Every rank takes the same decisions from different clocks.

    ``every_minutes``: a save is due on every rank when it is due on some rank (one small all-reduce
    per step).  ``every_steps="auto"``: each rank tunes an interval from its own measurements, and at
    every save (which every rank takes at the same step) they adopt the largest, one all-gather per
    save: in synchronous training the rank whose saves cost most stalls every rank.  Between saves the
    decision is local and needs no collective: same interval, same last saved step, same step.
    """

    def __init__(self, world: World, inner: SaveSchedule) -> None:
        super().__init__(inner.every_steps, inner.every_minutes, inner.clock, inner.max_overhead)
        self.auto = inner.auto
        self._world = world

    def due(self, step: int) -> bool:
        due = super().due(step)
        return self._world.control.any_true(due) if self.every_minutes is not None else due

    def _agree(self, interval: int) -> int:
        return max(int(n) for n in self._world.control.all_gather_json(interval))


def attach(storage: Storage, restore_mode: str = "direct", timeout_s: float = DEFAULT_TIMEOUT_S
           ) -> DistributedRun | None:
    """The distributed role of a new manager on ``storage``, or None when it saves on its own.

    None for a single process, and when the ranks opened different run directories (each rank
    checkpoints independently into its own, as before multi-rank checkpoints existed).  Collective
    under torch.distributed: every rank builds its manager.
    """
    if restore_mode not in RESTORE_MODES:
        raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {restore_mode!r}")
    world = World.detect(timeout_s)
    if world is None:
        return None
    runs = world.control.all_gather_json(storage.url)
    if any(run != runs[0] for run in runs):
        log.info("rank %d checkpoints into its own run directory %s (the ranks' directories differ)", world.rank,
                 storage.url)
        return None
    if not storage.shares_staging:
        raise NotImplementedError(f"{storage.url}: several ranks cannot save one checkpoint on "
                                  f"{type(storage).__name__} yet. Fix: a run directory on a filesystem every rank "
                                  "shares, or one run directory per rank (e.g. .../rank{RANK})")
    return DistributedRun(world, restore_mode)
