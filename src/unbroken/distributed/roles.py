"""Which state is saved once for all ranks and which once per rank, and who writes what.

* **Shared** entries, saved once: modules and optimizers.  Under DDP they are replicated; under
  FSDP2/DTensor their DTensor leaves are sharded.  Parameters and optimizer state are identical on
  every rank under DDP: those replicated tensors are spread over the ranks' files (whole tensors,
  largest first to the least loaded rank), so every rank writes about the same number of bytes.
  Every other replicated tensor of a module (buffers such as BatchNorm's running statistics, extra
  state) is written by rank 0: buffers can differ between ranks after a step (each rank's own
  batch) until DDP's next forward broadcasts rank 0's, so rank 0's are the ones the run goes on with.
* **Per-rank** entries, saved by every rank for itself: the RNG streams, data loaders and
  samplers, and every other value or object (LR schedulers, scalers, ``epoch``...), whose state is
  small and may differ between ranks.  Their tensors are renamed under ``unbroken.rankNNNNN/``.

Names under the reserved ``unbroken.`` prefix never collide with user state.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..format.values import Json

__all__ = ["SHARED_KINDS", "split_entries", "tensor_refs", "rename_refs", "rank_prefix", "shard_name",
           "file_name", "assign_writers"]

SHARED_KINDS = frozenset({"module", "optimizer"})
_REF_TAGS = ("__tensor__", "__ndarray__")


def split_entries(tree: dict[str, Json]) -> tuple[dict[str, Json], dict[str, Json]]:
    """``(shared, per_rank)`` entries of a snapshot's state tree, each in the original order."""
    shared: dict[str, Json] = {k: v for k, v in tree.items() if entry_kind(v) in SHARED_KINDS}
    return shared, {k: v for k, v in tree.items() if k not in shared}


def rank_prefix(rank: int) -> str:
    return f"unbroken.rank{rank:05d}/"


def shard_name(name: str, rank: int) -> str:
    """The stored name of rank ``rank``'s piece of sharded tensor ``name``."""
    return f"unbroken.shard{rank:05d}/{name}"


def file_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _refs(node: Json) -> Iterator[str]:
    if isinstance(node, dict):
        if len(node) == 1:
            (tag, arg), = node.items()
            if tag in _REF_TAGS and isinstance(arg, str):
                yield arg
                return
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def tensor_refs(tree: dict[str, Json]) -> list[str]:
    """Every tensor name a state tree refers to, in order of appearance."""
    return [name for node in tree.values() for name in _refs(node)]


def rename_refs(node: Json, rename: Callable[[str], str]) -> Json:
    """A copy of ``node`` with every tensor reference renamed."""
    if isinstance(node, dict):
        if len(node) == 1:
            (tag, arg), = node.items()
            if tag in _REF_TAGS and isinstance(arg, str):
                return {tag: rename(arg)}
        return {k: rename_refs(v, rename) for k, v in node.items()}
    if isinstance(node, list):
        return [rename_refs(v, rename) for v in node]
    return node


def assign_writers(sizes: Iterable[tuple[str, int]], world_size: int,
                   rank0: Iterable[tuple[str, int]] = ()) -> dict[str, int]:
    """Each replicated tensor to one rank: those of ``rank0`` to rank 0, then those of ``sizes``
    largest first, to the rank with the fewest bytes so far (ties to the lowest rank).
    Deterministic, so every rank computes the same assignment."""
    pinned = list(rank0)
    owner = dict.fromkeys((name for name, _ in pinned), 0)
    preload = sum(nbytes for _, nbytes in pinned)
    heap = [(preload if rank == 0 else 0, rank) for rank in range(world_size)]  # (bytes so far, rank)
    heapq.heapify(heap)
    for name, nbytes in sorted(sizes, key=lambda item: (-item[1], item[0])):
        load, rank = heapq.heappop(heap)
        owner[name] = rank
        heapq.heappush(heap, (load + nbytes, rank))
    return owner


def entry_kind(node: Any) -> str | None:
    return node.get("kind") if isinstance(node, dict) else None
