"""unbroken: crash-safe, bit-exact checkpointing and auto-resume for PyTorch training.

    ckpt = unbroken.CheckpointManager("runs/exp1", state={"model": model, "optimizer": opt},
                                      every_steps=1000, keep_last=3)
    start = ckpt.restore()
    for step in range(start, total_steps):
        ...
        ckpt.step(step + 1, metrics={"loss": loss})
    ckpt.close()
"""

from __future__ import annotations

from .catalog import CheckpointInfo, TensorInfo, is_checkpoint, list_checkpoints, read_info, verify
from .checkpoint import __version__
from .data import DataLoader, ResumableSampler
from .errors import (CheckpointExistsError, CheckpointNotFoundError, CheckpointSkippedWarning,
                     CorruptCheckpointError, DistributedError, PartialRestoreError, RunLockedError, StateMismatchError,
                     StorageError, UnbrokenError, UnserializableStateError, UnsupportedFormatError)
from .maintenance import PruneResult, copy_checkpoints, prune
from .manager import CheckpointManager
from .oneshot import load, save
from .preemption import EXIT_PREEMPTED, Preempted
from .records import CheckpointRecord
from .retention import KeepBest, KeepEvery, KeepLast

__all__ = [
    "__version__", "CheckpointManager", "CheckpointRecord", "save", "load",
    "list_checkpoints", "read_info", "verify", "is_checkpoint", "CheckpointInfo", "TensorInfo",
    "KeepLast", "KeepBest", "KeepEvery", "DataLoader", "ResumableSampler",
    "UnbrokenError", "CorruptCheckpointError", "PartialRestoreError", "UnsupportedFormatError",
    "UnserializableStateError",
    "StateMismatchError", "CheckpointNotFoundError", "CheckpointExistsError", "StorageError", "RunLockedError",
    "DistributedError",
    "CheckpointSkippedWarning", "Preempted", "EXIT_PREEMPTED", "prune", "PruneResult", "copy_checkpoints",
]
