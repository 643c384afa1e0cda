"""A checkpoint to read from, and its tensors read whole, one at a time.

A source is a checkpoint directory, or a run directory (its newest checkpoint with a valid manifest,
or ``step``), local or a URL.  Every tensor is read into memory of its own and checked against its
CRC32C before it is handed out; a sharded tensor (FSDP2/DTensor pieces of several ranks) is
assembled whole from its pieces.  Only one tensor (and, while assembling, one piece) is in memory
at a time, so two checkpoints larger than memory can be walked side by side.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._internal.warn import warn
from ..checkpoint.listing import check_named_step
from ..errors import CheckpointNotFoundError, CheckpointSkippedWarning, CorruptCheckpointError
from ..format import Manifest, TensorEntry
from ..format.dtypes import torch_dtype
from ..io import read_manifest
from ..io.reader import check_crc, check_tensor_file
from ..storage import ReadHandle, Storage, is_url, step_name
from ..storage.paths import committed_steps, is_checkpoint_dir, open_run, split_checkpoint_path

if TYPE_CHECKING:
    import torch

__all__ = ["Located", "locate", "TensorReader"]


@dataclass(frozen=True)
class Located:
    """One checkpoint: the storage of its run directory, its name there, and its validated manifest."""

    storage: Storage
    name: str
    manifest: Manifest

    @property
    def path(self) -> str:
        return f"{self.storage.url}/{self.name}"


def locate(source: str | os.PathLike[str], step: int | None = None,
           storage_options: dict[str, Any] | None = None) -> Located:
    """The checkpoint ``source`` names: itself when it is one, else the run's ``step`` or, without a
    step, the run's newest checkpoint whose manifest is valid (older ones are tried after a
    :class:`CheckpointSkippedWarning`).  Tensor data is not read here."""
    url = is_url(source)
    text = os.fspath(source).rstrip("/") if url else os.path.abspath(os.fspath(source))
    if is_checkpoint_dir(text, storage_options):
        storage, name = split_checkpoint_path(text, storage_options)
        located = _read(storage, name)
        if step is not None and step != located.manifest.step:
            raise CheckpointNotFoundError(f"{text} is the checkpoint of step {located.manifest.step}, not of step "
                                          f"{step}; to choose a step, give the run directory that holds it")
        return located
    if not url and not os.path.exists(text):
        raise CheckpointNotFoundError(f"{text}: no such checkpoint or run directory")
    if not url and not os.path.isdir(text):
        raise CheckpointNotFoundError(f"{text}: not a directory (expected a checkpoint or a run directory)")
    storage = open_run(text, storage_options)
    steps = committed_steps(storage)
    if step is not None:
        if step not in steps:
            have = ", ".join(map(str, steps[-10:])) if steps else "none"
            raise CheckpointNotFoundError(f"{text}: no checkpoint of step {step} (steps there: {have})")
        return _read(storage, step_name(step))
    for candidate in reversed(steps):
        try:
            return _read(storage, step_name(candidate))
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            warn(f"skipping checkpoint {storage.url}/{step_name(candidate)}: {exc}", CheckpointSkippedWarning)
    raise CheckpointNotFoundError(f"{text}: holds no valid checkpoint (no manifest.json, no step_* directory)")


def _read(storage: Storage, name: str) -> Located:
    manifest = read_manifest(storage, name)
    check_named_step(storage, name, manifest)
    return Located(storage, name, manifest)


class TensorReader(contextlib.AbstractContextManager["TensorReader"]):
    """Whole tensors of one checkpoint by their stored name (what the state tree refers to), each
    verified against its checksum.  Each file is opened, and checked against the manifest (size,
    header), once."""

    def __init__(self, located: Located) -> None:
        self.located = located
        self._handles: dict[str, ReadHandle] = {}
        self._stack = contextlib.ExitStack()

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The dtype name and shape of the whole tensor ``name``, from the manifest alone."""
        sharded = self.located.manifest.sharded.get(name)
        if sharded is not None:
            return sharded.dtype, sharded.shape
        entry = self._entry(name)
        return entry.dtype, entry.shape

    def read(self, name: str) -> torch.Tensor:
        import torch

        sharded = self.located.manifest.sharded.get(name)
        if sharded is None:
            return self._stored(name, self._entry(name))
        whole = torch.empty(sharded.shape, dtype=torch_dtype(sharded.dtype))
        for shard in sharded.shards:  # the manifest checked that they cover the whole exactly once
            box = tuple(slice(o, o + n) for o, n in zip(shard.offsets, shard.shape, strict=True))
            whole[box].copy_(self._stored(shard.tensor, self._entry(shard.tensor)))
        return whole

    def _entry(self, name: str) -> TensorEntry:
        entry = self.located.manifest.tensors.get(name)
        if entry is None:
            raise CorruptCheckpointError(f"{self.located.path}: the state refers to tensor {name!r}, which is not in "
                                         "the checkpoint")
        return entry

    def _stored(self, name: str, entry: TensorEntry) -> torch.Tensor:
        import torch

        from ..io.tensor_bytes import byte_view

        where = f"{self.located.path}/{entry.file}"
        tensor = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        view = byte_view(tensor)
        self._handle(entry.file, where).read_into(entry.begin, view)
        check_crc(view, name, entry, where)
        return tensor

    def _handle(self, file_name: str, where: str) -> ReadHandle:
        handle = self._handles.get(file_name)
        if handle is None:
            handle = self._stack.enter_context(self.located.storage.open(self.located.name, file_name))
            check_tensor_file(handle, self.located.manifest, file_name, where)
            self._handles[file_name] = handle
        return handle
