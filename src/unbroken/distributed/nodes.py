"""Which ranks share a local run directory: one shared filesystem, or one node-local directory per node.

A path names the same directory on every rank only on a shared filesystem: on node-local disks
``/scratch/run`` is another directory on each node.  Comparing paths or hostnames cannot tell (NFS
mounts one directory on many hosts; containers may share a hostname), so the ranks look: rank 0
creates a probe file with a fresh token in its directory and every rank checks whether it sees it
(one ``stat`` per rank, one all-reduce).  All do: the directory is shared, the usual case, done.
Otherwise every rank creates its own probe and lists its directory for this token's probes: the
ranks it sees are its node's (they share that directory); the lowest is the node's leader, which
begins and commits that node's copy of each checkpoint.  Rank 0 checks that the groups partition
the ranks (a directory shared by some nodes but not others is refused), so listing happens only on
node-local disks, where a directory holds a node's few probes.  Every probe is removed afterwards.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import StorageError
from .world import World

__all__ = ["NodeGroup", "node_group"]

PROBE_PREFIX = ".unbroken-probe-"


@dataclass(frozen=True)
class NodeGroup:
    """The ranks sharing this rank's (node-local) run directory, lowest first."""

    rank: int
    members: tuple[int, ...]

    @property
    def leader(self) -> int:
        return self.members[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader


def node_group(world: World, root: str) -> NodeGroup | None:
    """Collective: None when every rank's ``root`` is one directory, else this rank's node group."""
    token = world.control.broadcast_json(uuid.uuid4().hex[:12] if world.is_coordinator else None)
    probe = os.path.join(root, f"{PROBE_PREFIX}{token}-")
    problem = None
    if world.is_coordinator:
        problem = _touch(f"{probe}0")
    problem = world.control.broadcast_json(problem)
    if problem is not None:
        raise StorageError(f"rank 0 could not write a probe file into its run directory: {problem}")
    try:
        shared = not world.control.any_true(not os.path.exists(f"{probe}0"))
        if shared:
            return None
        mine = None if world.is_coordinator else _touch(f"{probe}{world.rank}")
        world.control.any_true(False)  # every probe exists before any rank lists
        seen = sorted(int(n[len(PROBE_PREFIX) + len(token) + 1:]) for n in _listing(root)
                      if n.startswith(f"{PROBE_PREFIX}{token}-"))
        world.control.any_true(False)  # every rank listed before any probe goes
    finally:
        _remove(f"{probe}{world.rank}")
    groups = world.control.gather_json({"seen": seen, "error": mine})
    verdict = _check(groups) if groups is not None else None
    verdict = world.control.broadcast_json(verdict)
    if verdict is not None:
        raise StorageError(f"the ranks' run directories {root!r} are neither one shared directory nor one per node: "
                           f"{verdict}. Fix: a run directory on a filesystem every rank shares, or a node-local "
                           "directory that only one node's ranks see")
    return NodeGroup(world.rank, tuple(seen))


def _check(groups: list[dict[str, Any]]) -> str | None:
    """Rank 0: a problem when the groups seen do not partition the ranks, else None."""
    for rank, group in enumerate(groups):
        if group["error"] is not None:
            return f"rank {rank} could not write a probe file: {group['error']}"
        if rank not in group["seen"]:
            return f"rank {rank} does not see its own probe file"
        for other in group["seen"]:
            if groups[other]["seen"] != group["seen"]:
                return (f"rank {rank} sees the directory of ranks {group['seen']}, but rank {other} sees that of "
                        f"ranks {groups[other]['seen']}")
    return None


def _touch(path: str) -> str | None:
    try:
        with open(path, "x"):
            pass
    except OSError as exc:
        return f"{path}: {exc}"
    return None


def _listing(root: str) -> list[str]:
    try:
        return os.listdir(root)
    except OSError:
        return []


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
