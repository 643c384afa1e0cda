"""Snapshotting tensors into reusable host buffers so training can go on while they are written.

The buffers are laid out exactly like the file's data section, so the writer streams them in a
few large writes.  They are allocated once and reused by later saves (pinned when tensors live on
a GPU, so the device→host copy runs at full speed).  With a memory budget smaller than the state,
two half-budget buffers alternate: the caller fills one while the writer drains the other, and
the caller returns once the last chunk is copied.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from .plan import Run, SaveLayout, flat_bytes

__all__ = ["HostBuffers", "BufferedSave"]

_POLL_S = 0.05
# A prepared buffer has room for a little more than asked (the snapshot adds RNG states and the like),
# so that the first save finds it large enough.
_HEADROOM_BYTES = 1 << 20
_PAGE = 4096

log = logging.getLogger(__name__)


class HostBuffers:
    """Owns the reusable host buffers of one manager (not the storage's staging area, where a checkpoint
    is written before its commit)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 2:
            raise ValueError(f"staging budget must be at least 2 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._buffers: list[torch.Tensor] = []
        self._pinned = False
        self._preparing: threading.Thread | None = None

    def prepare(self, nbytes: int, pinned: bool = False) -> threading.Thread | None:
        """Allocate and touch, in a background thread, the buffers a save of ``nbytes`` data bytes needs
        (within the budget), so that the first save does not pay their page faults.

        Never blocks: a save that arrives first waits for the preparation (it would otherwise fault the
        same pages in itself).  Call it only while no save uses the buffers (between saves).  Does
        nothing when the buffers in hand already fit.  The thread, or None when nothing is started."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be non-negative, got {nbytes}")
        if self._preparing is not None and self._preparing.is_alive():
            return None  # one preparation at a time; the first save resizes the buffers if it must
        self._preparing = None
        wanted = nbytes + nbytes // 64 + _HEADROOM_BYTES
        if self.budget_bytes is not None and nbytes <= self.budget_bytes < wanted:
            wanted = self.budget_bytes  # the headroom never takes the buffers over the budget
        if self._fits(self._sizes(wanted), pinned):
            return None
        thread = threading.Thread(target=self._prepare, args=(wanted, pinned), name="unbroken-prepare",
                                  daemon=True)
        self._preparing = thread
        thread.start()
        return thread

    def _prepare(self, nbytes: int, pinned: bool) -> None:
        try:
            self._allocate_for(self._sizes(nbytes), pinned, touch=True)
        except Exception:  # out of memory, no CUDA: the first save allocates (and reports) as before
            log.warning("preparing %d bytes of staging buffers failed; the first save allocates them", nbytes,
                        exc_info=True)

    def _join_preparation(self) -> None:
        thread, self._preparing = self._preparing, None
        if thread is not None:
            thread.join()

    def _sizes(self, data_bytes: int) -> list[int]:
        if self.budget_bytes is None or data_bytes <= self.budget_bytes:
            return [data_bytes]
        return [self.budget_bytes // 2] * 2

    def _fits(self, sizes: list[int], pinned: bool) -> bool:
        return (len(self._buffers) == len(sizes) and self._pinned == pinned
                and all(b.numel() >= s for b, s in zip(self._buffers, sizes, strict=True)))

    def _allocate_for(self, sizes: list[int], pinned: bool, touch: bool) -> None:
        self._buffers = []  # drop the old ones before allocating the new ones
        buffers = [_allocate(max(s, 1), pinned) for s in sizes]
        if touch:
            for buffer in buffers:
                buffer[::_PAGE].fill_(0)  # one write per page faults it in
        self._buffers, self._pinned = buffers, pinned

    def buffers_for(self, data_bytes: int, pinned: bool) -> list[torch.Tensor]:
        self._join_preparation()  # a save never races the preparation: it waits for it
        sizes = self._sizes(data_bytes)
        if not self._fits(sizes, pinned):
            self._allocate_for(sizes, pinned, touch=False)
        return self._buffers

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers)


def _allocate(size: int, pinned: bool) -> torch.Tensor:
    """Pinned memory for device tensors; otherwise an anonymous mapping with transparent huge pages,
    which cuts the page faults of the first save into a fresh buffer about threefold."""
    if pinned:
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)
    mapped = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapped.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapped, dtype=torch.uint8)  # keeps the mapping alive


class BufferedSave:
    """One save's tensors moving through the staging buffers: :meth:`fill` runs on the training
    thread, :meth:`runs` on the writer thread."""

    def __init__(self, host: HostBuffers, layout: SaveLayout, tensors: Mapping[str, torch.Tensor]) -> None:
        self.layout, self.plan, self.tensors = layout, layout.plan, tensors
        cuda = self.cuda = layout.cuda
        buffers = host.buffers_for(self.plan.data_bytes, pinned=cuda and torch.cuda.is_available())
        self.chunk = buffers[0].numel()
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for buffer in buffers:
            self._free.put(buffer)
        self._ready: queue.Queue[tuple[torch.Tensor, int, int] | BaseException | None] = queue.Queue()

    def fill(self, writer: Future[Any]) -> None:
        """Copy every tensor into the buffers, chunk by chunk; returns when the last chunk is copied.

        If the writer fails meanwhile, stops and returns (the error surfaces through its future).
        """
        start = 0
        try:
            while start < self.plan.data_bytes or start == 0:
                buffer = self._next_free(writer)
                if buffer is None:
                    return
                end = min(start + self.chunk, self.plan.data_bytes)
                self._copy_range(buffer, start, end)
                self._ready.put((buffer, start, end))
                start = end
                if end == self.plan.data_bytes:
                    break
        except BaseException as exc:
            self._ready.put(exc)  # the writer aborts the staging area
            raise
        self._ready.put(None)

    def _next_free(self, writer: Future[Any]) -> torch.Tensor | None:
        while True:
            try:
                return self._free.get(timeout=_POLL_S)
            except queue.Empty:
                if writer.done():
                    return None

    def _copy_range(self, buffer: torch.Tensor, start: int, end: int) -> None:
        """Copy the bytes of the data section in [start, end) (relative offsets) into ``buffer``.

        A batch of small CPU tensors wholly inside the range is concatenated straight into its place
        in the buffer (one copy); one cut by the range's edge goes through a temporary."""
        offsets = self.layout.offsets
        for batch in self.layout.batches:
            first, last = offsets[batch[0]], offsets[batch[-1] + 1]
            lo, hi = max(first, start), min(last, end)
            if lo >= hi:
                continue
            if len(batch) > 1:
                sources = self.layout.sources(self.tensors, batch)
                if lo == first and hi == last:
                    torch.cat(sources, out=buffer[lo - start:hi - start])
                    continue
                src = torch.cat(sources)
            else:  # straight from the tensor (a device tensor goes device→pinned host, asynchronously)
                span = self.plan.spans[batch[0]]
                src = flat_bytes(self.tensors[span.name], span.name)
            buffer[lo - start:hi - start].copy_(src[lo - first:hi - first], non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.synchronize()  # the copies above are asynchronous into pinned memory

    def runs(self) -> Iterator[Run]:
        """The data section as large runs, in file order (writer thread)."""
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise RuntimeError("snapshotting the state failed; the save is abandoned") from item
            buffer, start, end = item
            array: Any = buffer[: end - start].numpy()
            yield memoryview(array), self.layout.pieces(start, end)
            self._free.put(buffer)
