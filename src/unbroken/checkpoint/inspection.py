"""Looking at checkpoints without restoring them: list a run, read a manifest, verify every byte."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointNotFoundError
from ..format import Manifest
from ..format.dtypes import itemsize
from ..format.values import decode
from ..io import read_manifest, verify_checkpoint
from ..io.reader import VerifyProgress
from ..storage import is_url
from ..storage.paths import is_checkpoint_dir, open_run, split_checkpoint_path
from .listing import CheckpointRecord, check_named_step, decode_metrics, record_of, scan, scan_quarantined

__all__ = ["list_checkpoints", "read_info", "verify", "is_checkpoint", "CheckpointInfo", "TensorInfo"]


def is_checkpoint(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """True for a checkpoint directory or URL (it holds a manifest), False for a run directory."""
    return is_checkpoint_dir(path, storage_options)


def list_checkpoints(run_dir: str | os.PathLike[str], verify: bool = False,
                     storage_options: dict[str, Any] | None = None, quarantined: bool = False
                     ) -> list[CheckpointRecord]:
    """Every ``step_*`` checkpoint of ``run_dir`` (a path or URL), oldest first; ``verify`` checks
    every checksum.  ``quarantined`` adds the checkpoints set aside as corrupt (``quarantined=True``
    on their records), after the others.  ``storage_options`` go to fsspec for URLs (credentials, endpoint)."""
    storage = open_run(run_dir, storage_options)
    return scan(storage, verify=verify) + (scan_quarantined(storage) if quarantined else [])


@dataclass(frozen=True)
class TensorInfo:
    """Stands in for a tensor in :attr:`CheckpointInfo.state`: what it is, without reading its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def __repr__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's manifest, decoded: ``state`` maps each entry to ``(kind, value)`` where every
    tensor is a :class:`TensorInfo`."""

    manifest: Manifest
    state: dict[str, tuple[str, Any]]
    metrics: dict[str, Any]


def read_info(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """The validated, decoded manifest of the checkpoint at ``path`` (tensor data is not read)."""
    if not is_checkpoint_dir(path, storage_options):
        where = os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(path))
        raise CheckpointNotFoundError(f"{where}: not a checkpoint (no manifest.json)")
    storage, name = split_checkpoint_path(path, storage_options)
    manifest = read_manifest(storage, name)

    def info(tensor: str) -> TensorInfo:
        entry = manifest.tensors.get(tensor)
        sharded = manifest.sharded.get(tensor)
        if sharded is not None:  # saved by several ranks as pieces: the whole tensor's dtype and shape
            return TensorInfo(tensor, sharded.dtype, sharded.shape, math.prod(sharded.shape) * itemsize(sharded.dtype))
        if entry is None:
            return TensorInfo(tensor, "MISSING", (), 0)
        return TensorInfo(tensor, entry.dtype, entry.shape, entry.end - entry.begin)

    state = {key: (str(node.get("kind")), decode(node.get("value"), info)) for key, node in manifest.state.items()
             if isinstance(node, dict)}
    for key, node in (manifest.rank_state or [{}])[0].items():  # per-rank entries: rank 0's stand for all
        if isinstance(node, dict):
            state[f"{key} (rank 0 of {manifest.world_size})"] = (str(node.get("kind")), decode(node.get("value"), info))
    return CheckpointInfo(manifest, state, decode_metrics(manifest.metrics))


def verify(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *,
           progress: VerifyProgress | None = None) -> CheckpointRecord:
    """Check every byte of the checkpoint at ``path``; raises :class:`CorruptCheckpointError`.
    ``progress(name, total_bytes)`` may return a callback that receives the bytes checked (as in
    :func:`unbroken.copy_checkpoints`)."""
    storage, name = split_checkpoint_path(path, storage_options)
    manifest = verify_checkpoint(storage, name, progress)
    check_named_step(storage, name, manifest)
    return record_of(storage, name, manifest)
