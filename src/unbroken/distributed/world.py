"""Who this process is in a torch.distributed job, and the side groups unbroken talks on.

unbroken never uses the training's process group: a checkpoint's collectives run on two gloo
groups of its own (CPU, so a GPU job's NCCL streams are never touched), each created with a
timeout, so a rank that died or hangs makes the others fail with an error instead of waiting
forever.  ``saving`` carries the commit protocol (the background writer thread issues it);
``control`` carries the training thread's collectives (restore, save-schedule agreement).  Two
threads must never share one group: gloo pairs collectives by their order.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from .collectives import Comm

__all__ = ["World", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    saving: Comm
    control: Comm

    @property
    def is_coordinator(self) -> bool:
        """Rank 0 creates and commits the staging area, writes the manifest, applies retention."""
        return self.rank == 0

    @classmethod
    def detect(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> World | None:
        """The job's world when torch.distributed is initialised with more than one rank, else None.

        Creating the groups is collective: every rank must call this (constructing a manager) in
        the same order relative to other group creations.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        rank, size = dist.get_rank(), dist.get_world_size()
        timeout = datetime.timedelta(seconds=timeout_s)
        saving: Any = dist.new_group(backend="gloo", timeout=timeout)
        control: Any = dist.new_group(backend="gloo", timeout=timeout)
        return cls(rank, size, Comm(saving, rank, size), Comm(control, rank, size))
