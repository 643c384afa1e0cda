"""Live training objects ⇄ a flat set of tensors plus an exactly-typed JSON tree."""

from __future__ import annotations

from .capture import RNG_KEY, Snapshot, capture, check_state_keys
from .objects import Kind, unwrap_module
from .restore import restore_state

__all__ = ["Snapshot", "capture", "restore_state", "check_state_keys", "Kind", "unwrap_module", "RNG_KEY"]
