"""Restoring one checkpoint on one rank, whatever number of ranks saved it.

1. :func:`plan_load`: the state tree this rank restores (the shared entries plus its per-rank
   entries, :mod:`.rankstate`), and for every tensor in it the box of the whole tensor this rank
   needs: its own piece when the live tensor is a DTensor, else the whole tensor.  Each box is cut
   from the saved pieces that overlap it, and only their overlapping rows are read (rounded out to
   the checksum blocks), so a rank never reads the whole of a sharded tensor to get its piece.
2. a :class:`~.sources.Source` reads (or receives) and verifies those byte ranges;
3. :func:`build_tensors` assembles each box and wraps it like the live tensor (a DTensor with the
   live layout, or a plain tensor); every element must be covered exactly once;
4. :func:`apply` restores them through the single-process restore path (same checks, same order,
   RNG last), then re-derives the RNG of a rank that did not exist when the checkpoint was saved.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CorruptCheckpointError, StateMismatchError
from ..format import NAME_TO_DTYPE, Manifest, ShardEntry, TensorEntry
from ..format.cover import cover_problem
from ..format.values import Json
from ..state import capture, restore_state
from ..state.objects import Kind, classify
from ..storage import Storage
from .rankstate import choose_entries, derive_rng, saved_ranks
from .roles import tensor_refs
from .shards import Box, as_like, is_dtensor, overlap, region_of, volume
from .sources import DirectSource, Need, aligned

__all__ = ["LoadPlan", "plan_load", "build_tensors", "apply", "load_single", "read_whole"]

_MAX_PAIRWISE = 64


@dataclass
class _Piece:
    need: Need
    stored: ShardEntry  # the saved piece (offsets and shape in the whole tensor)
    box: Box            # the part of it this rank needs


@dataclass
class _Target:
    dtype: str
    box: Box
    live: Any
    sharded: bool
    pieces: list[_Piece] = field(default_factory=list)


@dataclass
class LoadPlan:
    tree: dict[str, Json]
    targets: dict[str, _Target]
    derive_rng: bool = False

    @property
    def needs(self) -> list[Need]:
        return sorted({p.need for t in self.targets.values() for p in t.pieces})


def plan_load(manifest: Manifest, state: MutableMapping[str, Any], rank: int, world_size: int,
              strict: bool) -> LoadPlan:
    shared, per_rank = saved_ranks(manifest)
    choice = choose_entries(per_rank, rank, world_size, state, manifest.tensors)
    if choice.problems and strict:
        raise StateMismatchError(f"the checkpoint was saved by {len(per_rank)} ranks and is restored on {world_size}:\n"
                                 "  - " + "\n  - ".join(choice.problems) + "\nFix: resume on the same number of "
                                 "ranks, or pass strict=False to keep these entries as they are")
    tree = {**shared, **choice.tree}
    live = _LiveTensors(state)
    targets = {name: _target(manifest, name, live.get(name)) for name in dict.fromkeys(tensor_refs(tree))}
    return LoadPlan(tree, targets, choice.derive_rng)


def _target(manifest: Manifest, name: str, live: Any) -> _Target:
    sharded = manifest.sharded.get(name)
    entry = manifest.tensors.get(name)
    if sharded is not None:
        dtype, shape, stored = sharded.dtype, sharded.shape, list(sharded.shards)
    elif entry is not None:
        dtype, shape, stored = entry.dtype, entry.shape, [ShardEntry(name, (0,) * len(entry.shape), entry.shape)]
    else:
        raise CorruptCheckpointError(f"the state refers to tensor {name!r}, which is not in the checkpoint")
    fits = live is not None and is_dtensor(live) and tuple(live.shape) == shape
    box: Box = region_of(live) if fits else ((0,) * len(shape), shape)
    target = _Target(dtype, box, live if fits else None, sharded is not None)
    for piece in stored:
        common = overlap(box, (piece.offsets, piece.shape)) if math.prod(box[1]) else None
        if common is not None:
            target.pieces.append(_Piece(_rows(manifest.tensors[piece.tensor], piece, common), piece, common))
    return target


def _rows(entry: TensorEntry, piece: ShardEntry, common: Box) -> Need:
    """The byte range of the stored piece holding the rows (dim 0) of ``common``."""
    if not piece.shape:
        return aligned(entry, piece.tensor, 0, entry.nbytes)
    row = entry.nbytes // piece.shape[0] if piece.shape[0] else 0
    first = common[0][0] - piece.offsets[0]
    return aligned(entry, piece.tensor, first * row, (first + common[1][0]) * row)


class _LiveTensors:
    """The live tensor at each state path (DTensors tell the layout to restore into).  A fresh
    optimizer has no state yet: its state tensors take the layout of their parameter."""

    def __init__(self, state: MutableMapping[str, Any]) -> None:
        self.tensors = capture(state, rng=False, for_save=False).tensors
        self.params = {key: [p for g in value.param_groups for p in g["params"]]
                       for key, value in state.items() if classify(value) is Kind.OPTIMIZER}

    def get(self, name: str) -> Any:
        if name in self.tensors:
            return self.tensors[name]
        for key, params in self.params.items():
            prefix = f"{key}/state/"
            if name.startswith(prefix):
                index = name[len(prefix):].split("/", 1)[0]
                if index.isdigit() and int(index) < len(params):
                    return params[int(index)]
        return None


def build_tensors(plan: LoadPlan, manifest: Manifest, data: dict[Need, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: _assemble(name, target, manifest, data) for name, target in plan.targets.items()}


def _assemble(name: str, target: _Target, manifest: Manifest, data: dict[Need, torch.Tensor]) -> torch.Tensor:
    offsets, shape = target.box
    dtype = NAME_TO_DTYPE[target.dtype]
    if not target.sharded and len(target.pieces) == 1 and target.pieces[0].stored.shape == shape:
        whole = _piece_rows(target.pieces[0], manifest.tensors[name], data[target.pieces[0].need], dtype)
        if whole.untyped_storage().nbytes() != whole.nbytes:  # a view into a larger read: own the memory
            whole = whole.clone()
        return as_like(target.live, whole) if target.live is not None else whole
    if target.sharded:
        _check_exact_cover(name, target)
    out = torch.empty(shape, dtype=dtype)
    for piece in target.pieces:
        rows = _piece_rows(piece, manifest.tensors[piece.need.tensor], data[piece.need], dtype)
        starts = (0,) + tuple(o - so for o, so in zip(piece.box[0][1:], piece.stored.offsets[1:])) if shape else ()
        source = rows[tuple(slice(s, s + n) for s, n in zip(starts, piece.box[1]))]
        out[tuple(slice(o - bo, o - bo + n) for o, bo, n in zip(piece.box[0], offsets, piece.box[1]))] = source
    if not target.sharded and not target.pieces and volume(target.box):
        raise CorruptCheckpointError(f"internal error: nothing read for {name!r}")
    return as_like(target.live, out) if target.live is not None else out


def _check_exact_cover(name: str, target: _Target) -> None:
    """The pieces must cover the box once: pairwise disjoint, and their volumes add up to the box's.
    (Crafted offsets could otherwise leave part of the tensor uninitialised.)  The manifest already
    checked this for the whole tensor; this is the same check on the part this rank assembles, and it
    allocates nothing of the box's size (:mod:`unbroken.format.cover`)."""
    problem = cover_problem([piece.box for piece in target.pieces], target.box, _MAX_PAIRWISE)
    if problem is not None:
        raise CorruptCheckpointError(f"the saved pieces of {name!r} overlap or leave part of "
                                     f"{list(target.box[0])}+{list(target.box[1])} uncovered: {problem}")


def _piece_rows(piece: _Piece, entry: TensorEntry, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stored piece's rows holding ``piece.box``, as a typed tensor (first row = box's first row)."""
    stored = piece.stored
    if not stored.shape:
        return _typed(raw, dtype).reshape(())
    row = entry.nbytes // stored.shape[0]
    first = (piece.box[0][0] - stored.offsets[0]) * row - piece.need.lo
    count = piece.box[1][0]
    chunk = raw[first:first + count * row]
    if chunk.numel() != count * row:
        raise CorruptCheckpointError(f"internal error: short range for {piece.need.tensor!r}")
    return _typed(chunk, dtype).reshape((count,) + stored.shape[1:])


def _typed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:  # bytes read at an offset that is not a multiple of the element size cannot be viewed
        return raw.view(dtype)
    except RuntimeError:
        return raw.clone().view(dtype)


def apply(plan: LoadPlan, state: MutableMapping[str, Any], tensors: dict[str, torch.Tensor], strict: bool,
          rng: bool, rank: int) -> None:
    restore_state(state, plan.tree, tensors, strict=strict, rng=rng)
    if rng and plan.derive_rng:
        derive_rng(rank)


def load_single(storage: Storage, name: str, manifest: Manifest, state: MutableMapping[str, Any], strict: bool,
                rng: bool) -> None:
    """One process restores a checkpoint saved by several ranks (every sharded tensor assembled whole,
    or cut to the live DTensors' pieces)."""
    plan = plan_load(manifest, state, 0, 1, strict)
    data = DirectSource().fetch(storage, name, manifest, plan.needs)
    apply(plan, state, build_tensors(plan, manifest, data), strict, rng, 0)


def read_whole(storage: Storage, name: str, manifest: Manifest, tensors: list[str]) -> dict[str, torch.Tensor]:
    """The stored tensors named ``tensors``, each whole (a sharded one assembled from its pieces, on
    one process) and owning its memory; only their bytes are read, every one verified."""
    plan = LoadPlan({}, {tensor: _target(manifest, tensor, None) for tensor in tensors})
    data = DirectSource().fetch(storage, name, manifest, plan.needs)
    return build_tensors(plan, manifest, data)
