"""DTensors: a rank's piece of a sharded tensor, where the piece sits in the whole, who stores it.

A sharded tensor is saved as the pieces its ranks hold, each with its global offsets (a box in the
whole tensor); the whole is never gathered.  On load, any rank asks for any box (its own piece
under a new layout, or the whole tensor for an unsharded model) and it is cut from the saved
pieces that overlap it.  Replicated mesh dimensions (HSDP) hold the same piece on several ranks:
the one at coordinate 0 of every replicated dimension stores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnserializableStateError

__all__ = ["LocalShard", "Box", "is_dtensor", "local_shard", "region_of", "overlap", "volume", "as_like",
           "whole_tensors", "holds_dtensors"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape)


def is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


@dataclass(frozen=True)
class LocalShard:
    """This rank's piece of a DTensor."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    placements: tuple[str, ...]
    mesh: tuple[int, ...]
    writer: bool


def local_shard(tensor: Any, where: str) -> LocalShard:
    """The piece of DTensor ``tensor`` this rank holds, and whether this rank stores it."""
    placements = tuple(tensor.placements)
    for placement in placements:
        kind = type(placement).__name__
        if kind == "Partial":
            raise UnserializableStateError(f"{where}: a DTensor with a Partial placement holds unreduced values. "
                                           "Fix: redistribute it to Shard/Replicate before saving")
        if kind not in ("Shard", "Replicate"):
            raise UnserializableStateError(f"{where}: DTensor placement {placement} is not supported (only Shard "
                                           "and Replicate pieces are contiguous boxes of the whole tensor)")
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    local = tensor.to_local()
    if coordinate is None:  # this rank is not part of the tensor's mesh: it holds nothing
        return LocalShard(local, tuple(tensor.shape), (0,) * tensor.dim(), _names(placements),
                          tuple(mesh.shape), False)
    shape, offsets = _local_box(tensor)
    if tuple(local.shape) != shape:
        raise UnserializableStateError(f"{where}: the local piece is {list(local.shape)}, but the DTensor's layout "
                                       f"says {list(shape)}; unbroken cannot tell where it belongs")
    writer = all(coordinate[i] == 0 for i, p in enumerate(placements) if type(p).__name__ == "Replicate")
    return LocalShard(local, tuple(tensor.shape), offsets, _names(placements), tuple(mesh.shape), writer)


def _local_box(tensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(int(d) for d in shape), tuple(int(o) for o in offsets)


def _names(placements: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(p) for p in placements)


def region_of(target: Any) -> Box:
    """The box of the whole tensor that ``target`` holds: a DTensor's local piece, or everything."""
    if is_dtensor(target):
        if target.device_mesh.get_coordinate() is None:
            return (0,) * target.dim(), (0,) * target.dim()
        shape, offsets = _local_box(target)
        return offsets, shape
    return (0,) * target.dim(), tuple(target.shape)


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes of one tensor, or None when it is empty."""
    offsets, shape = [], []
    for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if hi <= lo:
            return None
        offsets.append(lo)
        shape.append(hi - lo)
    return tuple(offsets), tuple(shape)


def volume(box: Box) -> int:
    return math.prod(box[1])


def as_like(target: Any, local: torch.Tensor) -> Any:
    """``local`` (this rank's box) as a DTensor laid out like ``target``; a plain tensor stays plain."""
    if not is_dtensor(target):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(target.to_local().device), target.device_mesh, target.placements,
                              run_check=False, shape=target.shape, stride=target.stride())


def whole_tensors(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``tensors`` for a single-process save: a DTensor on a one-device mesh is its local tensor (the
    whole); one spread over several ranks cannot be saved by one process."""
    if not any(is_dtensor(t) for t in tensors.values()):
        return tensors
    out = {}
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            if tensor.device_mesh.size() != 1:
                raise UnserializableStateError(
                    f"{name}: a DTensor spread over {tensor.device_mesh.size()} ranks cannot be saved by one "
                    "process. Fix: save with a CheckpointManager on every rank (each saves its piece)")
            tensor = tensor.to_local()
        out[name] = tensor
    return out


def holds_dtensors(state: Any) -> bool:
    """Whether a live state's modules or optimizers hold DTensors (they must be loaded as DTensors)."""
    for value in state.values():
        if isinstance(value, torch.nn.Module):
            params = list(value.parameters())
        elif isinstance(value, torch.optim.Optimizer):
            params = [p for group in value.param_groups for p in group["params"]]
        else:
            continue
        if any(is_dtensor(p) for p in params):
            return True
    return False
