"""Snapshotting tensors into reusable host buffers so training can go on while they are written.

The buffers are laid out exactly like the file's data section, so the writer streams them in a
few large writes.  They are allocated once and reused by later saves (pinned when tensors live on
a GPU, so the device→host copy runs at full speed).  With a memory budget smaller than the state,
two half-budget buffers alternate: the caller fills one while the writer drains the other, and
the caller returns once the last chunk is copied.
"""

from __future__ import annotations

import mmap
import queue
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from .plan import FilePlan, Run, batch_bytes, batches, flat_bytes

__all__ = ["HostBuffers", "BufferedSave"]

_POLL_S = 0.05


class HostBuffers:
    """Owns the reusable host buffers of one manager (not the storage's staging area, where a checkpoint
    is written before its commit)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 2:
            raise ValueError(f"staging budget must be at least 2 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._buffers: list[torch.Tensor] = []
        self._pinned = False

    def buffers_for(self, data_bytes: int, pinned: bool) -> list[torch.Tensor]:
        if self.budget_bytes is None or data_bytes <= self.budget_bytes:
            sizes = [data_bytes]
        else:
            sizes = [self.budget_bytes // 2] * 2
        reuse = (len(self._buffers) == len(sizes) and self._pinned == pinned
                 and all(b.numel() >= s for b, s in zip(self._buffers, sizes, strict=True)))
        if not reuse:
            self._buffers = []  # drop the old ones before allocating the new ones
            self._buffers = [_allocate(max(s, 1), pinned) for s in sizes]
            self._pinned = pinned
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

    def __init__(self, host: HostBuffers, plan: FilePlan, tensors: Mapping[str, torch.Tensor]) -> None:
        self.plan, self.tensors = plan, tensors
        cuda = any(t.device.type == "cuda" for t in tensors.values())
        self.cuda = cuda
        buffers = host.buffers_for(plan.data_bytes, pinned=cuda and torch.cuda.is_available())
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
        """Copy the bytes of the data section in [start, end) (relative offsets) into ``buffer``."""
        base = self.plan.data_start
        for batch in batches(self.plan, self.tensors):
            first, last = self.plan.spans[batch[0]], self.plan.spans[batch[-1]]
            lo, hi = max(first.begin - base, start), min(last.end - base, end)
            if lo >= hi:
                continue
            offset = first.begin - base
            if len(batch) > 1:  # small CPU tensors: one concatenation, one copy
                src = torch.frombuffer(batch_bytes(self.plan, self.tensors, batch)[0], dtype=torch.uint8)
            else:  # straight from the tensor (a device tensor goes device→pinned host, asynchronously)
                src = flat_bytes(self.tensors[first.name], first.name)
            buffer[lo - start:hi - start].copy_(src[lo - offset:hi - offset], non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.synchronize()  # the copies above are asynchronous into pinned memory

    def runs(self) -> Iterator[Run]:
        """The data section as large runs, in file order (writer thread)."""
        base = self.plan.data_start
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise RuntimeError("snapshotting the state failed; the save is abandoned") from item
            buffer, start, end = item
            array: Any = buffer[: end - start].numpy()
            data = memoryview(array)
            pieces = [(i, max(s.begin - base, start) - start, min(s.end - base, end) - start)
                      for i, s in enumerate(self.plan.spans) if s.begin - base < end and s.end - base > start]
            yield data, pieces
            self._free.put(buffer)
