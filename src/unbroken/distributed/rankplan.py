"""What one rank writes for a checkpoint saved by several ranks: its file's tensors and its report.

Every rank computes the same split and the same writer assignment from its own snapshot (by the
DDP/FSDP contract, the shared state has the same names and shapes on every rank); the coordinator
checks that the ranks' layouts agree before it commits.  Replicated parameters and optimizer state
are spread over the ranks; every other replicated module tensor (a buffer) is rank 0's
(:mod:`.roles`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..format import dtype_name
from ..format.values import Json
from ..io.checksum import crc32c
from ..state import Snapshot, unwrap_module
from .roles import (
    assign_writers,
    entry_kind,
    file_name,
    rank_prefix,
    rename_refs,
    shard_name,
    split_entries,
    tensor_refs,
)
from .shards import is_dtensor, local_shard

__all__ = ["RankPlan", "plan_rank", "parameter_tensors", "BLOCK_BYTES"]

BLOCK_BYTES = 1 << 20  # tensors above this get per-block checksums: ranged reads verify what they read


@dataclass
class RankPlan:
    rank: int
    file_name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Stored name -> the tensor this rank writes (a DTensor's local piece, a replicated tensor, ...)."""
    shared: dict[str, Json] = field(default_factory=dict)
    rank_state: dict[str, Json] = field(default_factory=dict)
    sharded: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Logical name -> global layout, plus ``shard`` ({tensor, offsets, shape}) if this rank stores one."""
    layout: list[list[Any]] = field(default_factory=list)
    """``[name, dtype, global shape, role]`` of every shared tensor: must be equal on every rank.  Roles:
    ``sharded``, ``replicated`` (spread over the ranks), ``buffer`` (replicated, written by rank 0)."""

    def digest(self) -> int:
        """CRC of the shared tree and layout: a cheap equality check between ranks."""
        text = json.dumps([self.shared, self.layout], sort_keys=True, separators=(",", ":"))
        return crc32c(text.encode("utf-8"))


def parameter_tensors(live: Mapping[str, Any], snap: Snapshot) -> frozenset[str]:
    """The tensors of ``snap`` that are parameters of the live modules (by their state-dict keys)."""
    names: set[str] = set()
    for key, value in live.items():
        entry = snap.state.get(key)
        if not isinstance(value, nn.Module) or entry_kind(entry) != "module" or not isinstance(entry, dict):
            continue
        saved = entry.get("value")
        if isinstance(saved, dict):
            params = dict.fromkeys(n for n, _ in unwrap_module(value).named_parameters(remove_duplicate=False))
            names.update(tensor_refs({n: saved[n] for n in params if n in saved}))
    return frozenset(names)


def plan_rank(snap: Snapshot, rank: int, world_size: int, parameters: Collection[str] = frozenset()) -> RankPlan:
    """This rank's part of saving ``snap``.  ``parameters`` (:func:`parameter_tensors`): the module
    tensors that are identical on every rank under DDP; every other module tensor, not known to be,
    is written by rank 0, whose buffers DDP broadcasts at the next forward."""
    shared, per_rank = split_entries(snap.state)
    plan = RankPlan(rank, file_name(rank), shared=shared)
    prefix = rank_prefix(rank)
    plan.rank_state = {k: rename_refs(v, lambda n: prefix + n) for k, v in per_rank.items()}
    for name in tensor_refs(per_rank):
        plan.tensors[prefix + name] = snap.tensors[name]
    module_tensors = set(tensor_refs({k: v for k, v in shared.items() if entry_kind(v) == "module"}))
    spread: list[tuple[str, int]] = []
    rank0: list[tuple[str, int]] = []
    for name in dict.fromkeys(tensor_refs(shared)):
        tensor = snap.tensors[name]
        if is_dtensor(tensor):
            _add_shard(plan, name, tensor)
            continue
        buffer = name in module_tensors and name not in parameters
        (rank0 if buffer else spread).append((name, tensor.numel() * tensor.element_size()))
        role = "buffer" if buffer else "replicated"
        plan.layout.append([name, dtype_name(tensor.dtype, name), list(tensor.shape), role])
    for name, owner in assign_writers(spread, world_size, rank0).items():
        if owner == rank:
            plan.tensors[name] = snap.tensors[name]
    return plan


def _add_shard(plan: RankPlan, name: str, tensor: Any) -> None:
    piece = local_shard(tensor, name)
    dtype = dtype_name(piece.local.dtype, name)
    info: dict[str, Any] = {"dtype": dtype, "shape": list(piece.global_shape), "placements": list(piece.placements),
                            "mesh": list(piece.mesh)}
    plan.layout.append([name, dtype, list(piece.global_shape), "sharded"])
    if piece.writer and piece.local.numel() > 0:
        stored = shard_name(name, plan.rank)
        plan.tensors[stored] = piece.local
        info["shard"] = {"tensor": stored, "offsets": list(piece.offsets), "shape": list(piece.local.shape)}
    plan.sharded[name] = info
