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

from ..distributed.collectives import Comm
from ..distributed.nodes import NodeGroup, node_group
from ..distributed.resume import restore_by_ranks
from ..distributed.sources import RESTORE_MODES, Source, source_for
from ..distributed.world import DEFAULT_TIMEOUT_S, World
from ..errors import CorruptCheckpointError, StorageError
from ..format import Manifest
from ..storage import LocalStorage, Storage, open_storage
from .rank_mirror import RankMirror, TieredStorage
from .rank_saver import DistributedSaver
from .retention import RetentionPolicy
from .schedule import SaveSchedule

__all__ = ["DistributedRun", "attach", "RESTORE_MODES"]

log = logging.getLogger("unbroken")


class DistributedRun:
    def __init__(self, world: World, restore_mode: str = "auto", node: NodeGroup | None = None,
                 remote: Storage | None = None, mirror_comm: Comm | None = None) -> None:
        """``node``, ``remote``, ``mirror_comm``: node-local run directories with ``mirror_to``, and the
        uploads' own group (:mod:`.rank_mirror`)."""
        if restore_mode not in RESTORE_MODES:
            raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {restore_mode!r}")
        self.world, self.restore_mode = world, restore_mode
        self.node, self.remote = node, remote
        self.last_source: Source | None = None
        self._mirror_comm = mirror_comm

    @property
    def owns_directory(self) -> bool:
        """This rank locks and prunes its run directory: rank 0, or each node's leader when node-local."""
        return self.world.is_coordinator if self.node is None else self.node.is_leader

    def mirror(self, local: Storage, policies: list[RetentionPolicy], on_uploaded: Callable[[str], None]
               ) -> RankMirror | None:
        """This rank's uploader when the run directories are node-local; None otherwise (rank 0 mirrors
        the shared directory alone)."""
        if self._mirror_comm is None or self.remote is None:
            return None
        return RankMirror(self._mirror_comm, local, self.remote, policies, on_uploaded=on_uploaded)

    @property
    def is_coordinator(self) -> bool:
        return self.world.is_coordinator

    def saver(self, storage: Storage, background: bool, budget_bytes: int | None,
              on_commit: Callable[[Manifest], None], live: MutableMapping[str, Any] | None = None
              ) -> DistributedSaver:
        return DistributedSaver(self.world, storage, background, budget_bytes, on_commit, live, self.node)

    def source(self) -> Source:
        return source_for(self.restore_mode, self.world.control)

    def restore(self, storage: Storage, state: MutableMapping[str, Any], strict: bool, rng: bool,
                step: int | None = None, path: str | os.PathLike[str] | None = None,
                on_corrupt: Callable[[str, CorruptCheckpointError], object] | None = None) -> Manifest | None:
        """Collective: every rank restores the same checkpoint (see :mod:`unbroken.distributed.resume`);
        ``on_corrupt`` runs on the coordinator for each checkpoint skipped as corrupt."""
        self.last_source = self.source()
        if self.node is not None and self.remote is not None and isinstance(storage, LocalStorage):
            if self.node.is_leader and not self.world.is_coordinator:  # rank 0 cleans its own in the restore
                storage.cleanup()
            # Each node holds only its ranks' files: the bucket serves the rest.  Nothing is quarantined
            # from a view whose missing files may simply be on another node.
            storage, on_corrupt = TieredStorage(storage, self.remote), None
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


def attach(storage: Storage, restore_mode: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
           mirror_to: str | None = None, mirror_options: dict[str, Any] | None = None) -> DistributedRun | None:
    """The distributed role of a new manager on ``storage``, or None when it saves on its own.

    None for a single process, and when the ranks opened different run directories without one
    ``mirror_to`` (each rank checkpoints independently into its own, as before multi-rank checkpoints
    existed).  Local run directories are probed (:mod:`unbroken.distributed.nodes`): one directory
    every rank sees is the shared case; a directory per node (the same path or not) needs one
    ``mirror_to`` for every rank: each node keeps its ranks' part, the bucket the whole checkpoint.
    Collective under torch.distributed: every rank builds its manager.
    """
    if restore_mode not in RESTORE_MODES:
        raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {restore_mode!r}")
    world = World.detect(timeout_s)
    if world is None:
        return None
    runs = world.control.all_gather_json([storage.url, mirror_to])
    same_run = all(run[0] == runs[0][0] for run in runs)
    one_mirror = mirror_to is not None and all(run[1] == mirror_to for run in runs)
    if not same_run and not (one_mirror and isinstance(storage, LocalStorage)):
        log.info("rank %d checkpoints into its own run directory %s (the ranks' directories differ)", world.rank,
                 storage.url)
        return None
    if isinstance(storage, LocalStorage):
        node = node_group(world, storage.root)
        if node is not None and mirror_to is not None and one_mirror:
            remote = open_storage(mirror_to, mirror_options, create=True)
            return DistributedRun(world, restore_mode, node, remote, _side_group(world, timeout_s))
        if node is not None:
            raise StorageError(f"{storage.url} is not one directory shared by every rank (rank {world.rank} sees the "
                               f"files of ranks {list(node.members)} only): several ranks cannot save one checkpoint "
                               "there. Fix: a run directory on a filesystem every rank shares, node-local directories "
                               "with mirror_to='s3://bucket/run' (the same on every rank), or one run directory per "
                               "rank (e.g. .../rank{RANK})")
    if not storage.shares_staging:
        raise NotImplementedError(f"{storage.url}: several ranks cannot save one checkpoint on "
                                  f"{type(storage).__name__} yet. Fix: a run directory on a filesystem every rank "
                                  "shares, or one run directory per rank (e.g. .../rank{RANK})")
    return DistributedRun(world, restore_mode)


def _side_group(world: World, timeout_s: float) -> Comm:
    """The uploads' own gloo group (created while every rank constructs its manager: collective)."""
    import datetime

    import torch.distributed as dist

    group: Any = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Comm(group, world.rank, world.size)
