"""Live training objects → a :class:`Snapshot`: a JSON tree of every value plus a flat dict of tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import needs_adoption
from ..errors import UnserializableStateError
from ..format.dtypes import check_storable
from ..format.values import Json, encode
from .objects import RESERVED_PREFIX, Kind, classify, unwrap_module
from .rng import capture_rng

__all__ = ["Snapshot", "capture", "check_state_keys", "RNG_KEY"]

RNG_KEY = RESERVED_PREFIX + "rng"


@dataclass
class Snapshot:
    """The whole training state at one step; tensors are still the live ones (not copies)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Json] = field(default_factory=dict)
    # A save checks every tensor here, before any later step trips over one without plain bytes; a
    # restore captures its live targets only for their names and layouts, and those may be meta tensors
    # (a model built on the meta device, materialized from the checkpoint).
    for_save: bool = True

    def add_tensor(self, path: str, tensor: torch.Tensor) -> str:
        if self.for_save:
            check_storable(tensor, path)
        name, n = path, 1
        while name in self.tensors:  # keys containing "/" could collide with nested paths
            n += 1
            name = f"{path}#{n}"
        self.tensors[name] = tensor
        return name


def check_state_keys(state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of name -> object, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"state keys must be non-empty strings, got {key!r}")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(f"state key {key!r}: names starting with {RESERVED_PREFIX!r} are reserved; rename it")
        _kind_of(key, value)


def _kind_of(key: str, value: Any) -> Kind:
    if needs_adoption(value):
        raise UnserializableStateError(
            f"state entry {key!r}: a plain torch DataLoader has no position to save. Fix: register it in a "
            "CheckpointManager's state before iterating (it is made resumable in place), or use "
            "unbroken.DataLoader")
    try:
        return classify(value)
    except TypeError:
        raise UnserializableStateError(
            f"state entry {key!r}: a {type(value).__qualname__} is a callable without state_dict()/"
            "load_state_dict(); it cannot be saved. Fix: register the object that owns its state."
        ) from None


def capture(state: Mapping[str, Any], rng: bool = True, *, for_save: bool = True) -> Snapshot:
    """Encode every entry of ``state`` (and the RNG streams when ``rng``); ``for_save=False`` when the
    tensors are restore targets, which need no bytes of their own."""
    check_state_keys(state)
    snap = Snapshot(for_save=for_save)
    for key, value in state.items():
        snap.state[key] = _capture_entry(key, value, snap)
    if rng:
        snap.state[RNG_KEY] = {"kind": Kind.RNG.value, "value": encode(capture_rng(), RNG_KEY, snap.add_tensor)}
    return snap


def _capture_entry(key: str, value: Any, snap: Snapshot) -> Json:
    kind = _kind_of(key, value)
    if kind is Kind.MODULE:
        module_state = unwrap_module(value).state_dict()
        # The per-submodule versions in _metadata drive load-time upgrades (e.g. BatchNorm); keep them.
        meta = dict(getattr(module_state, "_metadata", {}) or {})
        return {"kind": kind.value, "value": encode(dict(module_state), key, snap.add_tensor),
                "meta": encode(meta, f"{key}/_metadata", snap.add_tensor)}
    if kind in (Kind.OPTIMIZER, Kind.STATEFUL):
        return {"kind": kind.value, "value": encode(value.state_dict(), key, snap.add_tensor)}
    return {"kind": kind.value, "value": encode(value, key, snap.add_tensor)}
