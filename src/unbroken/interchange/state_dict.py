"""``unbroken.read_state_dict``: one state entry of a checkpoint as a plain ``dict[str, Tensor]``.

The entry is found in the manifest's state tree (the entries saved once for all ranks, or those every
rank saved alike), its tensor references are collected without reading any data, and only those
tensors are read, each verified against its checksum and whole: a tensor a DDP run spread over the
ranks' files is read from the file that holds it, a sharded (FSDP2/DTensor) one is assembled from its
pieces.  Nothing is restored into live objects, so no optimizer is needed, nothing is warned about
and the global random streams are not touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..checkpoint.target import Target, use_checkpoint
from ..distributed.load import read_whole
from ..distributed.rankstate import choose_entries, saved_ranks
from ..format import Manifest
from ..format.dtypes import itemsize, torch_dtype
from ..format.values import Json, decode
from ..state.objects import RESERVED_PREFIX

if TYPE_CHECKING:
    import torch

__all__ = ["read_state_dict", "StateEntry", "use_entry", "float_dtype"]

T = TypeVar("T")


@dataclass(frozen=True)
class _Ref:
    """Stands in for a stored tensor while the state tree is resolved: nothing is read yet."""

    name: str


@dataclass(frozen=True)
class StateEntry:
    """The tensors of one entry of one checkpoint, before any of their bytes are read."""

    target: Target
    entry: str
    refs: dict[str, str]
    """Each key of the state dict -> the stored tensor holding it."""

    @property
    def manifest(self) -> Manifest:
        return self.target.manifest

    @property
    def path(self) -> str:
        return self.target.path

    def dtype_of(self, key: str) -> str:
        stored = self.refs[key]
        sharded = self.manifest.sharded.get(stored)
        return sharded.dtype if sharded is not None else self.manifest.tensors[stored].dtype

    def shape_of(self, key: str) -> tuple[int, ...]:
        stored = self.refs[key]
        sharded = self.manifest.sharded.get(stored)
        return sharded.shape if sharded is not None else self.manifest.tensors[stored].shape

    def nbytes(self, key: str, dtype: torch.dtype | None) -> int:
        """Bytes of the tensor at ``key`` once cast to ``dtype`` (floating-point tensors only)."""
        stored = self.dtype_of(key)
        size = itemsize(stored)
        if dtype is not None and torch_dtype(stored).is_floating_point:
            size = dtype.itemsize
        return math.prod(self.shape_of(key)) * size

    def read(self, keys: list[str], dtype: torch.dtype | None = None, device: Any = "cpu"
             ) -> dict[str, torch.Tensor]:
        """The tensors at ``keys``, whole and verified, cast and moved as asked.  Read as one batch
        (small neighbours coalesced into one read); ``interchange.reading.TensorReader`` says why
        ``diff`` reads otherwise."""
        wanted = list(dict.fromkeys(self.refs[k] for k in keys))
        tensors = read_whole(self.target.storage, self.target.name, self.manifest, wanted)
        out = {}
        for key in keys:
            tensor = tensors[self.refs[key]]
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[key] = tensor.to(device)
        return out


def read_state_dict(source: str | os.PathLike[str], entry: str = "model", *, step: int | None = None,
                    device: Any = "cpu", dtype: torch.dtype | str | None = None,
                    storage_options: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The state entry ``entry`` of a checkpoint as a plain state dict, ready for ``load_state_dict``.

    ``source`` is a checkpoint directory, or a run directory (its newest valid checkpoint, or ``step``);
    either may be a URL (``s3://bucket/run``), with ``storage_options`` for fsspec.  ``entry`` names a
    state entry (``"model"``, ``"ema"``, ``"ema_0.9999"``) or a dotted path inside one: ``"ema.module"``
    is the model inside an ``AveragedModel``, ``"model.encoder"`` the state dict of a submodule (its
    keys without the ``encoder.`` prefix), ``"checkpoint.model"`` a dict saved inside a plain value.

    The keys are exactly those of the module's ``state_dict()`` (without ``module.``/``_orig_mod.``
    prefixes of DDP or ``torch.compile`` wrappers), each tensor whole: assembled from every rank's file
    and every sharded piece.  Every byte read is verified against its checksum.  ``dtype`` casts the
    floating-point tensors only (integer buffers such as BatchNorm's ``num_batches_tracked`` keep
    theirs); ``device`` is where the tensors go.  No warning, no optimizer, the global RNG untouched.
    A run whose newest checkpoint is damaged falls back to the one before, with a
    :class:`~unbroken.CheckpointSkippedWarning`.
    """
    cast = float_dtype(dtype)
    return use_entry(source, entry, step, storage_options, lambda found: found.read(list(found.refs), cast, device))


def float_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` (a torch dtype or its name, e.g. ``"bfloat16"``) as a floating-point torch dtype."""
    import torch

    if dtype is None:
        return None
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a floating-point torch dtype such as torch.bfloat16 or "
                         "'bfloat16', 'float16', 'float32' (only floating-point tensors are cast)")
    return found


def use_entry(source: str | os.PathLike[str], entry: str, step: int | None,
              storage_options: dict[str, Any] | None, use: Callable[[StateEntry], T]) -> T:
    """``use(the entry of the checkpoint source names)``.  For the newest checkpoint of a run, one
    found damaged (while locating or inside ``use``, e.g. a tensor failing its checksum) is skipped
    with a warning for the one before (:mod:`unbroken.checkpoint.target`)."""
    return use_checkpoint(source, step, storage_options, lambda target: use(_resolve(target, entry)))


def _resolve(target: Target, entry: str) -> StateEntry:
    manifest = target.manifest
    entries = _entries(manifest)
    key, rest = _split_entry(entry, entries, target.path)
    node = entries[key]
    if node is None:
        raise ValueError(f"state entry {key!r} of {target.path} differs between the "
                         f"{manifest.world_size} ranks that saved it, so no one state dict is the entry; "
                         "export an entry saved once for all ranks (a module, e.g. 'model')")
    value = decode(node.get("value") if isinstance(node, dict) else None, _Ref)
    found = _descend(value, rest, key)
    return StateEntry(target, entry, _tensor_dict(found, entry))


def _entries(manifest: Manifest) -> dict[str, Json | None]:
    """Every state entry a single process can read: shared ones, and per-rank ones every rank saved
    alike (None for those that differ between ranks)."""
    shared, per_rank = saved_ranks(manifest)
    entries: dict[str, Json | None] = dict(shared)
    rank_keys = [k for ranks in per_rank for k in ranks if not k.startswith(RESERVED_PREFIX)]
    if rank_keys:
        alike = choose_entries(per_rank, 0, 1, {}, manifest.tensors).tree
        entries.update({k: alike.get(k) for k in dict.fromkeys(rank_keys)})
    return {k: v for k, v in entries.items() if not k.startswith(RESERVED_PREFIX)}


def _split_entry(entry: str, entries: Mapping[str, Any], where: str) -> tuple[str, list[str]]:
    """The longest leading dotted part of ``entry`` that names an entry (``ema_0.9999`` is one
    entry), and the rest of the path."""
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"entry={entry!r}: expected the name of a state entry, e.g. 'model'")
    parts = entry.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in entries:
            return ".".join(parts[:cut]), parts[cut:]
    raise ValueError(f"no state entry {entry!r} in {where}; its entries: {sorted(entries) or 'none'}")


def _descend(value: Any, rest: list[str], where: str) -> Any:
    """The value at the dotted path ``rest`` inside ``value``; in a state dict (flat keys holding
    dots), a path that names no key selects the keys under it, with the prefix removed."""
    while rest:
        if isinstance(value, (list, tuple)) and rest[0].isdigit() and int(rest[0]) < len(value):
            value, where, rest = value[int(rest[0])], f"{where}.{rest[0]}", rest[1:]
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{where!r} is {_kind(value)}, which has no {'.'.join(rest)!r} inside")
        for cut in range(len(rest), 0, -1):
            key = ".".join(rest[:cut])
            hit = key if key in value else int(key) if key.isdigit() and int(key) in value else None
            if hit is not None:
                value, where, rest = value[hit], f"{where}.{key}", rest[cut:]
                break
        else:
            prefix = ".".join(rest) + "."
            under = {k[len(prefix):]: v for k, v in value.items() if isinstance(k, str) and k.startswith(prefix)}
            if not under:
                keys = sorted({str(k).split(".")[0] for k in value})
                raise ValueError(f"{where!r} holds nothing at {'.'.join(rest)!r}; it holds: {keys[:20]}")
            return under
    return value


def _tensor_dict(value: Any, entry: str) -> dict[str, str]:
    if isinstance(value, _Ref):
        raise ValueError(f"{entry!r} is one tensor, not a state dict; name the dict that holds it")
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{entry!r} is {'an empty dict' if value == {} else _kind(value)}, not a state "
                         "dict of tensors; pick a module's entry (e.g. 'model', 'ema') or a dict of tensors "
                         "inside one")
    refs = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, _Ref):
            what = "a non-string key" if not isinstance(key, str) else _kind(item)
            raise ValueError(f"{entry!r} is not a state dict of tensors: {key!r} is {what}; pick a module's "
                             "entry (e.g. 'model') or a dict of tensors inside the state")
        refs[key] = item.name
    return refs


def _kind(value: Any) -> str:
    if isinstance(value, _Ref):
        return "a tensor"
    if isinstance(value, dict):
        return "a dict"
    return f"a value of type {type(value).__name__}"
