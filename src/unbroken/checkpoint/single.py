"""One checkpoint end to end: capture + write on save; read + verify + restore on load."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .._internal.gcpause import paused_gc
from .._internal.version import __version__
from ..distributed.shards import holds_dtensors, whole_tensors
from ..format import Manifest
from ..format.values import Json, encode
from ..io import FilePlan, live_runs, mapped_tensors, read_manifest, write_checkpoint
from ..state import Snapshot, capture, restore_state
from ..state.capture import RNG_KEY
from ..storage import Storage
from .listing import check_named_step

__all__ = ["versions", "build_manifest", "save_checkpoint", "load_checkpoint"]


def versions() -> dict[str, str]:
    return {"unbroken": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def build_manifest(snap: Snapshot, step: int, metrics: Mapping[str, Any] | None, metadata: Any,
                   world_size: int = 1) -> Manifest:
    """The manifest of ``snap`` before its files are written (files and tensors are filled by the writer)."""
    return Manifest(step=step, created=time.time(), world_size=world_size, versions=versions(), files={},
                    tensors={}, state=snap.state,
                    metrics=_encode_metrics(metrics or {}), metadata=encode(metadata, "metadata", _no_tensors))


def _encode_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers, or ``None`` for a metric missing at this step (stored as null; never "best" for keep_best)."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            raise TypeError(f"metric {name!r}={value!r}: metrics must map str names to numbers "
                            "(or None for a metric missing at this step)")
        out[name] = encode(value, f"metrics/{name}", _no_tensors)
    return out


def _no_tensors(where: str, _tensor: torch.Tensor) -> str:
    raise TypeError(f"{where}: metrics and metadata must not hold tensors; use .item() or .tolist()")


def save_checkpoint(storage: Storage, name: str, state: Mapping[str, Any], step: int,
                    metrics: Mapping[str, Any] | None = None, metadata: Any = None, rng: bool = True) -> Manifest:
    with paused_gc():
        snap = capture(state, rng=rng)
        tensors = whole_tensors(snap.tensors)
        plan = FilePlan.build(tensors)
        manifest = build_manifest(snap, step, metrics, metadata)
    return write_checkpoint(storage, name, plan, live_runs(plan, tensors), manifest)


def load_checkpoint(storage: Storage, name: str, state: MutableMapping[str, Any], strict: bool = True,
                    rng: bool = True, only: bool = False) -> Manifest:
    """Verify every byte of checkpoint ``name``, then restore it into ``state``.

    A checkpoint named after a step (``step_N``) must say it holds step N: the name is what the run is
    resumed from, so a mismatch is corruption, found before any live object is touched.

    Module parameters and buffers, and the state of the optimizers torch ships, are copied straight
    from the mapped files into the live tensors: no copy of the checkpoint is held in memory.

    ``only``: restore the entries of ``state`` alone (and the RNG streams when ``rng``); the other
    saved entries are left out as if they had not been saved, and only the bytes of what is restored
    are read and verified."""
    with paused_gc():  # parsing the manifest and decoding the state allocate one object per tensor
        manifest = read_manifest(storage, name)
        check_named_step(storage, name, manifest)
        # several ranks' state, loading into DTensors, or a part of the state: read only what is restored
        if only or manifest.rank_state is not None or manifest.sharded or holds_dtensors(state):
            from ..distributed.load import load_single

            load_single(storage, name, _given_entries(manifest, state, rng) if only else manifest, state, strict, rng)
            return manifest
        with mapped_tensors(storage, name, manifest) as mapped:  # every checksum verified before use
            restore_state(state, manifest.state, mapped, strict=strict, rng=rng, views=True)
    return manifest


def _given_entries(manifest: Manifest, state: Mapping[str, Any], rng: bool) -> Manifest:
    """``manifest`` as if only the entries of ``state`` (and the RNG streams, with ``rng``) were saved."""
    wanted = set(state) | ({RNG_KEY} if rng else set())

    def kept(tree: dict[str, Json]) -> dict[str, Json]:
        return {key: node for key, node in tree.items() if key in wanted}

    ranks = None if manifest.rank_state is None else [kept(tree) for tree in manifest.rank_state]
    return replace(manifest, state=kept(manifest.state), rank_state=ranks)
