"""Running saves for the manager: synchronously, or in the background with at most one in flight.

Invariants:
* a save is committed (and listed) only after every byte is durable; a failed background save
  leaves nothing behind and its error is raised by the next ``step()``/``save()``/``close()``;
* the training thread returns from a background save as soon as the state is copied into the
  staging buffers, so it may change the tensors right after;
* a save due while another is in flight waits for it (``when_busy="wait"``) or is skipped with a
  warning (``"skip"``): the host buffers are reused, so two saves can never share them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from .._internal.gcpause import paused_gc
from .._internal.warn import warn
from ..distributed.shards import whole_tensors
from ..errors import StorageError, UnbrokenError
from ..format import Manifest
from ..io import AsyncWriter, BufferedSave, FilePlan, HostBuffers, SyncWriter, live_runs, write_checkpoint
from ..io.plan import LayoutCache, Run
from ..state import Snapshot, capture
from ..storage import Storage

__all__ = ["SaveRunner"]


class SaveRunner:
    def __init__(self, storage: Storage, background: bool, when_busy: str, budget_bytes: int | None,
                 on_commit: Callable[[Manifest], None]) -> None:
        self.storage, self.background, self.when_busy = storage, background, when_busy
        self._on_commit = on_commit
        self._writer = AsyncWriter() if background else SyncWriter()
        self._buffers = HostBuffers(budget_bytes) if background else None
        self._pending: tuple[int, Future[Manifest]] | None = None
        # The file layout of the last save, reused while the tensors keep their names, dtypes and shapes.
        self._layouts = LayoutCache()

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending[1].done()

    def skips(self, step: int) -> bool:
        """Whether a save of ``step`` due now is skipped (with a warning): one is in flight and
        ``when_busy="skip"``.  Decided once, before the caller collects the previous save's outcome."""
        if self.busy and self.when_busy == "skip":
            message = f"checkpoint for step {step} skipped: the previous save is still being written"
            warn(message, RuntimeWarning)
            return True
        return False

    def save(self, name: str, step: int, snap: Snapshot, manifest: Manifest) -> Future[Manifest]:
        """Start saving ``snap``.  The caller collects the previous save first (:meth:`wait`), so that its
        failure is reported as that save's, never raised as this one's."""
        if self._pending is not None:
            raise RuntimeError("internal error: a save started before the previous one was collected")
        # The collector stays off for the whole hand-over (a synchronous save: the whole save); the
        # background writer pauses it only around its own bursts of small objects.
        with paused_gc():
            tensors = self._file_tensors(snap)
            layout = self._layouts.layout_for(tensors)
            plan = layout.plan
            if self._buffers is None:
                runs = live_runs(plan, tensors, layout)
                future = self._writer.submit(lambda: self._commit(name, step, plan, runs, manifest))
            else:
                staged = BufferedSave(self._buffers, layout, tensors)
                future = self._writer.submit(lambda: self._commit(name, step, plan, staged.runs(), manifest))
                staged.fill(future)  # returns once the state is copied: training may modify it again
        self._pending = (step, future)
        return future

    def prepare(self, nbytes: int, pinned: bool = False) -> None:
        """Allocate and touch the staging buffers for a state of ``nbytes`` tensor bytes in the
        background, so that the first background save does not pay their page faults (within the
        staging budget).  Never blocks; a save that starts first waits for the preparation.  Does
        nothing for synchronous saves or while a save is in flight (its buffers are in use)."""
        if self._buffers is not None and self._pending is None:
            self._buffers.prepare(nbytes, pinned)

    def prepare_for(self, state: Mapping[str, Any], rng: bool) -> None:
        """:meth:`prepare` for the tensors a save of ``state`` would write now (a new manager, or one
        just restored).  A state that cannot be captured yet is left for the first save to report."""
        if self._buffers is None or self._pending is not None:
            return
        try:
            with paused_gc():
                tensors = list(self._file_tensors(capture(state, rng=rng)).values())
        except (UnbrokenError, TypeError, ValueError):
            return
        self.prepare(sum(t.numel() * t.element_size() for t in tensors),
                     pinned=torch.cuda.is_available() and any(t.is_cuda for t in tensors))

    def _file_tensors(self, snap: Snapshot) -> Mapping[str, torch.Tensor]:
        """The tensors this process writes (a rank of a distributed save writes only its part)."""
        return whole_tensors(snap.tensors)

    def _write(self, name: str, step: int, plan: FilePlan, runs: Iterable[Run],  # noqa: ARG002 (step: for subclasses)
               manifest: Manifest) -> Manifest:
        """Write and commit checkpoint ``name``; its committed manifest."""
        return write_checkpoint(self.storage, name, plan, runs, manifest)

    def _commit(self, name: str, step: int, plan: FilePlan, runs: Iterable[Run], manifest: Manifest) -> Manifest:
        try:
            committed = self._write(name, step, plan, runs, manifest)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(exc.errno, f"saving step {step} to {self.storage.url} failed: "
                               f"{exc.strerror or exc}. Earlier checkpoints are intact. Fix: free space or fix "
                               "the directory; later saves will try again") from exc
        self._on_commit(committed)
        return committed

    def wait(self) -> Manifest | None:
        """Block until the save in flight is committed; raise its error if it failed (once)."""
        if self._pending is None:
            return None
        step, future = self._pending
        self._pending = None
        return future.result()

    def raise_if_failed(self) -> None:
        """Raise the error of a background save that already failed; never blocks."""
        if self._pending is not None and self._pending[1].done() and self._pending[1].exception() is not None:
            self.wait()

    @property
    def pending_step(self) -> int | None:
        return self._pending[0] if self._pending is not None else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._writer.close()
