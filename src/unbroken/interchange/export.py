"""``unbroken.export``: a state entry of a checkpoint as plain safetensors (one file or HF-style shards).

One file, ``model.safetensors``, or when it would exceed ``max_shard_size`` the layout Hugging Face
loaders read: ``model-00001-of-00003.safetensors``... plus ``model.safetensors.index.json`` mapping
each key to its shard.  Each file's metadata records where it came from (``unbroken.step``,
``unbroken.checkpoint``, ``unbroken.entry``; ``format: pt``).

Crash-safe: every file is written under a temporary name, fsynced, and given its final name by a hard
link that fails rather than replace an existing file (nothing is ever overwritten); the index is
published last, so a set of shards without its index was never completed.  One shard's tensors are
in memory at a time.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..io.reader import VerifyProgress as Progress
from ..storage import is_url
from ..storage.local import fsync_dir, make_dirs_durably
from .state_dict import StateEntry, float_dtype, use_entry

if TYPE_CHECKING:
    import torch

__all__ = ["export", "ExportResult", "parse_size"]

_SUFFIX = ".safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*$")
# With a progress callback, a shard's tensors are read in batches of about this many bytes (at most
# _PROGRESS_STEPS of them) so that progress moves while a large shard is read; without one, in one batch.
_PROGRESS_BATCH = 128 * 10**6
_PROGRESS_STEPS = 64


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: ``paths`` (the shards in order, then the index when sharded), the
    source checkpoint and its step, the entry, the number of tensors and their bytes."""

    paths: tuple[str, ...]
    step: int
    checkpoint: str
    entry: str
    tensors: int
    bytes: int
    index: str | None = None


def export(source: str | os.PathLike[str], out: str | os.PathLike[str], *, step: int | None = None,
           entry: str = "model", dtype: torch.dtype | str | None = None, max_shard_size: int | str | None = None,
           storage_options: dict[str, Any] | None = None, progress: Progress | None = None) -> ExportResult:
    """Write state entry ``entry`` of a checkpoint as safetensors a model's ``load_state_dict`` takes.

    ``source``, ``step``, ``entry``, ``dtype`` and ``storage_options`` are those of
    :func:`~unbroken.read_state_dict`.  ``out`` is a file (``<name>.safetensors``) or else a directory
    (created if need be), which gets ``model.safetensors``.  With
    ``max_shard_size`` (bytes, or ``"5GB"``, ``"500MB"``: decimal units, as Hugging Face counts; ``GiB``
    etc. are binary) a larger export is split into shards ``<name>-00001-of-0000N.safetensors`` with
    ``<name>.safetensors.index.json``.  Existing files are never overwritten: remove them first.

    ``progress(file_name, total_bytes)`` is called as each output file is begun and may return a
    callback that receives the bytes of its tensors as they are read and verified (they add up to
    ``total_bytes``, the file's tensor bytes after ``dtype``), as :func:`unbroken.verify` reports.
    """
    limit = parse_size(max_shard_size)
    cast = float_dtype(dtype)
    directory, stem = _output(out)
    return use_entry(source, entry, step, storage_options,
                     lambda found: _write(found, directory, stem, cast, limit, progress))


def parse_size(size: int | str | None) -> int | None:
    """``max_shard_size`` in bytes: an int, or text such as ``"5GB"`` (10^9) or ``"4GiB"`` (2^30)."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        number = size
    else:
        match = _SIZE.match(size) if isinstance(size, str) else None
        unit = match.group(2).upper() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or text like '5GB', '500MB' "
                             "(decimal: 1 GB = 10^9 bytes) or '4GiB' (binary)")
        number = int(float(match.group(1)) * _UNITS[unit])
    if number <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be more than 0 bytes")
    return number


def _output(out: str | os.PathLike[str]) -> tuple[str, str]:
    """``(directory, stem)`` of the output: the file named ``<stem>.safetensors``, or else a directory
    (existing or not) to hold ``model.safetensors``."""
    text = os.fspath(out)
    if is_url(text):
        raise ValueError(f"{text}: export writes to a local path; write it locally, then upload the files")
    full = os.path.abspath(text)
    base = os.path.basename(full)
    if text.endswith(("/", os.sep)) or os.path.isdir(full) or not base.endswith(_SUFFIX) or base == _SUFFIX:
        return full, "model"
    return os.path.dirname(full), base[:-len(_SUFFIX)]


def _write(found: StateEntry, directory: str, stem: str, dtype: torch.dtype | None, limit: int | None,
           progress: Progress | None) -> ExportResult:
    keys = list(found.refs)
    sizes = {key: found.nbytes(key, dtype) for key in keys}
    groups = _shards(keys, sizes, limit)
    single = len(groups) == 1
    names = [f"{stem}{_SUFFIX}"] if single else [
        f"{stem}-{i:05d}-of-{len(groups):05d}{_SUFFIX}" for i in range(1, len(groups) + 1)]
    index = None if single else f"{stem}{_SUFFIX}.index.json"
    _refuse_existing(directory, [*names, f"{stem}{_SUFFIX}", f"{stem}{_SUFFIX}.index.json"])
    make_dirs_durably(directory)
    metadata = {"format": "pt", "unbroken.step": str(found.manifest.step), "unbroken.checkpoint": found.path,
                "unbroken.entry": found.entry}
    with _publishing(directory) as publish:
        for name, group in zip(names, groups, strict=True):
            advance = progress(name, sum(sizes[k] for k in group)) if progress is not None else None
            publish(name, lambda path, group=group, advance=advance:
                    _save(_read(found, group, sizes, dtype, advance), path, metadata))
        if index is not None:
            weight_map = {key: name for name, group in zip(names, groups, strict=True) for key in group}
            document = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            publish(index, lambda path: _save_json(document, path))
    written = tuple(os.path.join(directory, n) for n in [*names, *([index] if index else [])])
    return ExportResult(written, found.manifest.step, found.path, found.entry, len(keys), sum(sizes.values()),
                        os.path.join(directory, index) if index else None)


def _read(found: StateEntry, keys: list[str], sizes: dict[str, int], dtype: torch.dtype | None,
          advance: Callable[[int], None] | None) -> dict[str, torch.Tensor]:
    """The tensors at ``keys``; with ``advance``, read in batches, each one's bytes reported once read."""
    if advance is None:
        return found.read(keys, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for batch in _shards(keys, sizes, max(_PROGRESS_BATCH, sum(sizes[k] for k in keys) // _PROGRESS_STEPS)):
        tensors.update(found.read(batch, dtype))
        advance(sum(sizes[k] for k in batch))
    return tensors


def _shards(keys: list[str], sizes: dict[str, int], limit: int | None) -> list[list[str]]:
    """Keys in order, a new shard whenever the next tensor would take the current one past ``limit``
    (a tensor larger than ``limit`` gets a shard of its own), as Hugging Face splits checkpoints."""
    if limit is None or sum(sizes.values()) <= limit:
        return [keys]
    groups: list[list[str]] = [[]]
    held = 0
    for key in keys:
        if groups[-1] and held + sizes[key] > limit:
            groups.append([])
            held = 0
        groups[-1].append(key)
        held += sizes[key]
    return groups


def _refuse_existing(directory: str, names: list[str]) -> None:
    existing = [os.path.join(directory, n) for n in dict.fromkeys(names) if os.path.lexists(os.path.join(directory, n))]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists; export never overwrites files: remove "
                              f"{'it' if len(existing) == 1 else 'them: ' + ', '.join(existing)}, or export to "
                              "another path")


@contextmanager
def _publishing(directory: str) -> Iterator[Any]:
    """``publish(name, write)``: ``write(temporary path)``, fsync, then give it ``name`` without ever
    replacing a file.  If anything fails, the files published so far and the temporary are removed."""
    published: list[str] = []

    def publish(name: str, write: Any) -> None:
        final = os.path.join(directory, name)
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            write(temporary)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            _link_new(temporary, final)
            published.append(final)
        finally:
            if os.path.lexists(temporary):
                os.unlink(temporary)

    try:
        yield publish
    except BaseException:
        for path in published:
            os.unlink(path)
        raise
    finally:
        fsync_dir(directory)


def _link_new(temporary: str, final: str) -> None:
    """Give ``temporary`` the name ``final``, atomically, failing if ``final`` exists."""
    try:
        os.link(temporary, final)  # unlike a rename, never replaces an existing file
    except FileExistsError:
        raise FileExistsError(f"{final} appeared while exporting; export never overwrites files") from None
    except OSError:  # a filesystem without hard links: check, then rename (a race remains)
        if os.path.lexists(final):
            raise FileExistsError(f"{final} already exists; export never overwrites files") from None
        os.rename(temporary, final)


def _save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def _save_json(document: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=False)
        handle.write("\n")
