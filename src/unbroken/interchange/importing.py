"""``unbroken.import_checkpoint``: existing torch checkpoints (weights-only) become an unbroken checkpoint.

The sources (files or directories of one training step) are read by :mod:`.formats` into state
entries, each with the kind of object it restores into (a module, an optimizer, a scheduler, a plain
value), then written as ``step_N`` of the run with the checkpoint writer every save uses, so that
``CheckpointManager(run, state={...}).restore()`` resumes from it.  Everything is read and encoded
before the run is touched: a source that cannot be imported leaves the run as it was.  See
docs/IMPORT.md for the formats and the entries each gives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .._internal.warn import warn
from ..checkpoint.listing import CheckpointRecord, record_of
from ..checkpoint.single import build_manifest
from ..errors import CheckpointExistsError, UnserializableStateError
from ..format import Manifest
from ..format.values import encode
from ..io import FilePlan, live_runs, write_checkpoint
from ..io.plan import Run
from ..io.reader import VerifyProgress as Progress
from ..manager.run_directory import open_run_directory
from ..manager.runlock import run_locked
from ..state.capture import Snapshot
from ..state.objects import Kind
from ..storage import Storage, is_url, step_name
from ..storage.paths import committed_steps
from .formats import Entry, Found, read_source

__all__ = ["import_checkpoint"]

_BUSY = ("an import there could race its saves and retention. Fix: import when that training has stopped, or into "
         "another run directory")

Source = str | os.PathLike[str]


def import_checkpoint(sources: Source | Sequence[Source], run: Source, *, step: int | None = None,
                      storage_options: dict[str, Any] | None = None, progress: Progress | None = None
                      ) -> CheckpointRecord:
    """Import the torch checkpoint(s) of one training step as checkpoint ``step_N`` of ``run``.

    sources: a file (``.pt``/``.pth``/``.bin``/``.ckpt``/``.safetensors``) or a directory (a Hugging Face
    Trainer ``checkpoint-N``, a consistency-models log directory), or a list of them; local paths.
    run: the run directory (local or URL, with ``storage_options`` for fsspec); created if missing.
    step: the step to record; by default it is read from the sources' contents or names.

    Files are loaded with ``torch.load(weights_only=True)`` only.  Never overwrites: an existing
    ``step_N`` is refused.  A local run is locked while the checkpoint is written, so an import cannot
    race a training that is saving there.

    ``progress(name, total_bytes)`` may return a callback for the bytes done (as
    :func:`unbroken.verify` reports): once per source as it is loaded (its name and size on disk,
    reported whole when ``torch.load`` returns), then once for the checkpoint written (``step_N`` and
    its tensor bytes, reported as they are written).  The bytes of each add up to its total.
    """
    paths = _source_paths(sources)
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    found = [_load(path, step, progress) for path in paths]
    chosen, origin = _choose_step(found, step, paths)
    snap = _snapshot(_merge(found))
    metadata = {"imported": {"format": "+".join(dict.fromkeys(f.format for f in found)),
                             "sources": [os.path.abspath(p) for p in paths], "step_from": origin,
                             "notes": [note for f in found for note in f.notes]}}
    storage = open_run_directory(run, storage_options)
    name = step_name(chosen)
    with run_locked(storage, busy=_BUSY):
        if storage.exists(name):
            raise CheckpointExistsError(f"{storage.url}/{name} already exists; an import never overwrites. Fix: "
                                        "pass --step with another step, or import into another run directory")
        manifest = _write(storage, name, snap, chosen, metadata, progress)
    newer = [s for s in committed_steps(storage) if s > chosen]
    if newer:
        warn(f"{storage.url} also holds newer checkpoints (steps {newer}): restore() resumes from the newest; "
             f"restore(step={chosen}) resumes from the imported one", UserWarning)
    return record_of(storage, name, manifest)


def _load(path: str, step: int | None, progress: Progress | None) -> Found:
    """One source read; torch.load reports nothing while it runs, so its bytes are reported whole."""
    advance = progress(os.path.basename(path), _disk_size(path)) if progress is not None else None
    found = read_source(path, step)
    if advance is not None:
        advance(_disk_size(path))
    return found


def _disk_size(path: str) -> int:
    """A file's size, or the size of the files directly in a directory."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())


def _source_paths(sources: Source | Sequence[Source]) -> list[str]:
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise ValueError("no source to import: pass a checkpoint file or directory")
    paths = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"a source must be a path, got {type(item).__name__}")
        if is_url(item):
            raise ValueError(f"{os.fspath(item)}: sources are read from local files. Fix: copy it here first")
        paths.append(os.path.abspath(os.fspath(item)))
    return paths


def _choose_step(found: list[Found], step: int | None, paths: list[str]) -> tuple[int, str]:
    """The step given, else the one every clue agrees on (from contents or names), with where it came from."""
    if step is not None:
        return step, "step=" + str(step)
    clues = [clue for f in found for clue in f.steps]
    steps = sorted({clue.step for clue in clues})
    if len(steps) == 1:
        return steps[0], ", ".join(dict.fromkeys(clue.where for clue in clues))
    if steps:
        said = "; ".join(f"{clue.step} from {clue.where}" for clue in clues)
        raise ValueError(f"the sources disagree on the step ({said}). Fix: pass --step N (Python: step=N) with "
                         "the number of steps the checkpoint holds")
    hints = " ".join(h + "." for f in found for h in f.hints)
    raise ValueError(f"no step found for {', '.join(paths)}: neither the names nor the contents say one. {hints} "
                     "Fix: pass --step N (Python: step=N), the number of training steps done when it was saved")


def _merge(found: list[Found]) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for f in found:
        for key, entry in f.entries.items():
            if key in entries:
                raise ValueError(f"both {entries[key].source} and {entry.source} hold the state entry {key!r}; "
                                 "one checkpoint has one of each. Fix: import them into separate runs")
            entries[key] = entry
    return entries


def _snapshot(entries: dict[str, Entry]) -> Snapshot:
    """The entries as a checkpoint's state tree, laid out as capture() lays out live objects of their kind."""
    snap = Snapshot()
    for key, entry in entries.items():
        try:
            if entry.kind is Kind.MODULE:
                # The per-submodule versions drive load-time upgrades (e.g. BatchNorm); torch.save kept them.
                meta = dict(getattr(entry.value, "_metadata", {}) or {})
                snap.state[key] = {"kind": entry.kind.value, "value": encode(dict(entry.value), key, snap.add_tensor),
                                   "meta": encode(meta, f"{key}/_metadata", snap.add_tensor)}
            else:
                snap.state[key] = {"kind": entry.kind.value, "value": encode(entry.value, key, snap.add_tensor)}
        except UnserializableStateError as exc:
            raise UnserializableStateError(f"{entry.source}: {exc}") from None
    return snap


def _write(storage: Storage, name: str, snap: Snapshot, step: int, metadata: Any, progress: Progress | None
           ) -> Manifest:
    plan = FilePlan.build(snap.tensors)
    manifest = build_manifest(snap, step, None, metadata)
    runs: Iterable[Run] = live_runs(plan, snap.tensors)
    advance = progress(name, sum(span.nbytes for span in plan.spans)) if progress is not None else None
    if advance is not None:
        runs = _reported(runs, advance)
    return write_checkpoint(storage, name, plan, runs, manifest)


def _reported(runs: Iterable[Run], advance: Callable[[int], None]) -> Iterator[Run]:
    """``runs``, each one's tensor bytes reported when the writer asks for the next (it is written then)."""
    for run in runs:
        yield run
        advance(sum(end - start for _, start, end in run[1]))
