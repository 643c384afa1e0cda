"""Saves by several ranks, run like single-process saves (synchronously or in the background).

The manager's :class:`~unbroken.manager.save_runner.SaveRunner` decides when a save runs and snapshots the state; this
subclass changes what is written (this rank's part only, :mod:`unbroken.distributed.rankplan`) and how it is committed
(the protocol of :mod:`unbroken.distributed.commit`).  Every rank must start the same saves in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..distributed.commit import save_by_ranks
from ..distributed.nodes import NodeGroup
from ..distributed.rankplan import RankPlan, parameter_tensors, plan_rank
from ..distributed.world import World
from ..format import Manifest
from ..io.plan import FilePlan, Run
from ..state import Snapshot
from ..storage import Storage
from .save_runner import SaveRunner

__all__ = ["DistributedSaver"]


class DistributedSaver(SaveRunner):
    def __init__(self, world: World, storage: Storage, background: bool, budget_bytes: int | None,
                 on_commit: Callable[[Manifest], None], live: Mapping[str, Any] | None = None,
                 node: NodeGroup | None = None) -> None:
        """``live``: the manager's state, whose modules tell parameters from buffers (without it every
        module tensor is written by rank 0: exact, with less parallel writing).  ``node``: this rank's
        node group when the run directories are node-local (each node commits its own copy)."""
        # "skip" would let one rank skip a save that another starts: the ranks must agree, so they wait.
        super().__init__(storage, background, "wait", budget_bytes, on_commit)
        self.world, self._live, self._node = world, live, node
        self._plan: RankPlan | None = None

    def _file_tensors(self, snap: Snapshot) -> Mapping[str, torch.Tensor]:
        # Called after the previous save finished (SaveRunner.save waits first), so the in-flight save
        # never sees its plan replaced.
        parameters = parameter_tensors(self._live, snap) if self._live is not None else frozenset()
        self._plan = plan_rank(snap, self.world.rank, self.world.size, parameters)
        return self._plan.tensors

    def _write(self, name: str, step: int, plan: FilePlan, runs: Iterable[Run], manifest: Manifest) -> Manifest:
        if self._plan is None:
            raise RuntimeError("internal error: a distributed save without its rank plan")
        return save_by_ranks(self.world, self.storage, name, step, self._plan, plan, runs, manifest,
                             self._node)
