"""unbroken: crash-safe, bit-exact checkpointing and auto-resume for PyTorch training.

    ckpt = unbroken.CheckpointManager("runs/exp1", state={"model": model, "optimizer": opt},
                                      every_steps=1000, keep_last=3)
    start = ckpt.restore()
    for step in range(start, total_steps):
        ...
        ckpt.step(step + 1, metrics={"loss": loss})
    ckpt.close()

The names below are the public API.  They are imported on first use (PEP 562), so ``import unbroken``
is cheap and tools that never touch tensors (``unbroken run``, ``unbroken ls``) do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._internal.lazy import lazy_attributes
from ._internal.version import __version__
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointSkippedWarning,
    CorruptCheckpointError,
    DistributedError,
    PartialRestoreError,
    RunDirectoryReplacedError,
    RunLockedError,
    StateMismatchError,
    StorageError,
    UnbrokenError,
    UnserializableStateError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    from .checkpoint.inspection import CheckpointInfo, TensorInfo, is_checkpoint, list_checkpoints, read_info, verify
    from .checkpoint.listing import CheckpointRecord
    from .checkpoint.oneshot import load, save
    from .data import DataLoader, ResumableSampler, make_resumable
    from .interchange.diff import diff
    from .interchange.diff_result import CheckpointDiff
    from .interchange.export import ExportResult, export
    from .interchange.importing import import_checkpoint
    from .interchange.state_dict import read_state_dict
    from .manager.checkpoint_manager import CheckpointManager
    from .manager.maintenance import PruneResult, copy_checkpoints, prune, quarantine_corrupt
    from .manager.preemption import EXIT_PREEMPTED, Preempted
    from .manager.retention import KeepBest, KeepEvery, KeepLast

# public name -> the module that defines it
_LAZY = {
    "CheckpointManager": "manager.checkpoint_manager",
    "save": "checkpoint.oneshot", "load": "checkpoint.oneshot",
    "list_checkpoints": "checkpoint.inspection", "read_info": "checkpoint.inspection",
    "verify": "checkpoint.inspection", "is_checkpoint": "checkpoint.inspection",
    "CheckpointInfo": "checkpoint.inspection", "TensorInfo": "checkpoint.inspection",
    "CheckpointRecord": "checkpoint.listing",
    "KeepLast": "manager.retention", "KeepBest": "manager.retention", "KeepEvery": "manager.retention",
    "DataLoader": "data", "ResumableSampler": "data", "make_resumable": "data",
    "Preempted": "manager.preemption", "EXIT_PREEMPTED": "manager.preemption",
    "prune": "manager.maintenance", "PruneResult": "manager.maintenance",
    "copy_checkpoints": "manager.maintenance", "quarantine_corrupt": "manager.maintenance",
    "export": "interchange.export", "read_state_dict": "interchange.state_dict",
    "import_checkpoint": "interchange.importing", "diff": "interchange.diff",
    "CheckpointDiff": "interchange.diff_result", "ExportResult": "interchange.export",
}

__all__ = [
    "__version__", "CheckpointManager", "CheckpointRecord", "save", "load",
    "list_checkpoints", "read_info", "verify", "is_checkpoint", "CheckpointInfo", "TensorInfo",
    "KeepLast", "KeepBest", "KeepEvery", "DataLoader", "ResumableSampler", "make_resumable",
    "UnbrokenError", "CorruptCheckpointError", "PartialRestoreError", "UnsupportedFormatError",
    "UnserializableStateError",
    "StateMismatchError", "CheckpointNotFoundError", "CheckpointExistsError", "StorageError", "RunLockedError",
    "RunDirectoryReplacedError", "DistributedError",
    "CheckpointSkippedWarning", "Preempted", "EXIT_PREEMPTED", "prune", "PruneResult", "copy_checkpoints",
    "quarantine_corrupt", "export", "read_state_dict", "import_checkpoint", "diff", "CheckpointDiff", "ExportResult",
]


__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
