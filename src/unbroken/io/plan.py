"""The layout of one tensor file, decided before any byte is written, and the byte runs that fill it.

A :class:`FilePlan` is the safetensors header plus each tensor's span.  Writers consume *runs*:
``(bytes, pieces)`` where ``bytes`` is a memoryview of the next stretch of the file's data section
and each piece ``(span index, lo, hi)`` says which span ``bytes[lo:hi]`` belongs to, so the writer
checksums per tensor while writing large stretches.  Live tensors give one run per tensor; staged
host buffers give a few large runs.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..format import TensorSpan, build_header, dtype_name
from .tensor_bytes import byte_view, dense_values, host_tensor

__all__ = ["FilePlan", "Run", "live_runs", "flat_bytes", "batches", "batch_bytes", "group_of", "SaveLayout",
           "LayoutCache", "RUN_BYTES"]

SMALL_TENSOR = 1 << 20
BATCH_BYTES = 64 << 20
# A save copies small tensors in batches of at most this much: a scratch buffer this size, reused by
# every batch, stays in the CPU's caches, and each run is still one large write.
RUN_BYTES = 8 << 20
# dtypes torch.cat supports on every build we target (the unsigned 16/32/64-bit ones lack kernels)
_CAT_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64}

Piece = tuple[int, int, int]
Run = tuple[memoryview, list[Piece]]


@dataclass(frozen=True)
class FilePlan:
    header: bytes
    spans: list[TensorSpan]

    @classmethod
    def build(cls, tensors: Mapping[str, torch.Tensor]) -> FilePlan:
        """Tensors grouped by state entry, and within an entry by element size, largest first: every
        tensor of a group then starts at a multiple of its element size relative to the group's start,
        so a reader can view one block read of a group as typed tensors without copying."""
        entries = [(n, dtype_name(t.dtype, n), tuple(t.shape)) for n, t in tensors.items()]  # noqa: C416
        first_seen: dict[str, int] = {}
        for name, _, _ in entries:
            first_seen.setdefault(group_of(name), len(first_seen))
        entries.sort(key=lambda e: (first_seen[group_of(e[0])], -tensors[e[0]].element_size()))
        header, spans = build_header(entries)
        return cls(header, spans)

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def data_bytes(self) -> int:
        return self.spans[-1].end - self.data_start if self.spans else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_bytes


def group_of(name: str) -> str:
    """The state entry a tensor belongs to (the first component of its name)."""
    return name.split("/", 1)[0]


def batches(plan: FilePlan, tensors: Mapping[str, torch.Tensor], limit: int = BATCH_BYTES) -> Iterator[list[int]]:
    """Span indices in file order, consecutive small CPU tensors of one dtype batched together (at most
    ``limit`` bytes a batch), so thousands of tiny tensors cost a few large copies instead of
    thousands of small ones."""
    batch: list[int] = []
    size = 0
    for index, span in enumerate(plan.spans):
        tensor = tensors[span.name]
        small = (span.nbytes <= SMALL_TENSOR and tensor.device.type == "cpu" and tensor.dtype in _CAT_DTYPES
                 and tensor.layout == torch.strided)
        if batch and (not small or tensor.dtype != tensors[plan.spans[batch[0]].name].dtype
                      or size + span.nbytes > limit):
            yield batch
            batch, size = [], 0
        if small:
            batch.append(index)
            size += span.nbytes
        else:
            yield [index]
    if batch:
        yield batch


def batch_bytes(plan: FilePlan, tensors: Mapping[str, torch.Tensor], batch: list[int]) -> Run:
    """One run holding the bytes of the spans in ``batch`` (consecutive in the file)."""
    if len(batch) == 1:
        span = plan.spans[batch[0]]
        data = byte_view(host_tensor(tensors[span.name], span.name))
        return data, [(batch[0], 0, len(data))]
    flats = [flat_bytes(tensors[plan.spans[i].name], plan.spans[i].name) for i in batch]
    data = byte_view(torch.cat(flats))
    pieces, offset = [], 0
    for index in batch:
        n = plan.spans[index].nbytes
        pieces.append((index, offset, offset + n))
        offset += n
    return data, pieces


def live_runs(plan: FilePlan, tensors: Mapping[str, torch.Tensor], layout: SaveLayout | None = None
              ) -> Iterator[Run]:
    """Stream from tensor memory: large tensors directly (a device tensor is copied to the host one at
    a time), small ones batched; extra memory stays under one batch (RUN_BYTES).

    A batch is concatenated straight into one scratch buffer reused by every batch: the consumer is
    done with a run when it asks for the next one (as with staging buffers).  ``layout`` (of this
    ``plan``) supplies cached views of the small tensors."""
    if layout is None:
        layout = SaveLayout(tensors, plan)
    scratch: torch.Tensor | None = None
    for batch in layout.batches:
        if len(batch) == 1:
            yield batch_bytes(plan, tensors, batch)
            continue
        first, last = layout.offsets[batch[0]], layout.offsets[batch[-1] + 1]
        if scratch is None:
            scratch = torch.empty(_largest_batch(layout), dtype=torch.uint8)
        torch.cat(layout.sources(tensors, batch), out=scratch[:last - first])
        yield byte_view(scratch[:last - first]), [(i, layout.offsets[i] - first, layout.offsets[i + 1] - first)
                                                  for i in batch]


def _largest_batch(layout: SaveLayout) -> int:
    offsets = layout.offsets
    return max((offsets[b[-1] + 1] - offsets[b[0]] for b in layout.batches if len(b) > 1), default=0)


def flat_bytes(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """A flat uint8 view of a tensor's values on its own device (a contiguous copy only if needed)."""
    tensor = dense_values(tensor, where)
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8)


Kind = tuple[torch.dtype, torch.Size, torch.device, torch.layout]


def _kinds(tensors: Mapping[str, torch.Tensor]) -> list[Kind]:
    return [(t.dtype, t.shape, t.device, t.layout) for t in tensors.values()]


class SaveLayout:
    """A :class:`FilePlan` with its batches and the flat byte views of its batched tensors, built once
    and reused by every later save of the same tensors.

    It is reusable while the names (in order), dtypes, shapes, devices and layouts are unchanged
    (:meth:`matches`): the file's header and layout depend on nothing else.  A batch's cached views
    are used only while each of its tensors still starts at the same address, is contiguous and
    carries no negative bit (batched dtypes are real: no conjugate bit), and each view still starts
    there: a view then covers exactly its tensor's bytes.  Otherwise the views are made again (a
    tensor replaced by ``p.data = ...``, or a new one from the snapshot).  Views are kept only for
    batched tensors (small, on the CPU), where making one costs more than copying the bytes; they
    keep a replaced tensor's memory alive until the next save.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], plan: FilePlan | None = None) -> None:
        self.names = list(tensors)
        self.kinds = _kinds(tensors)
        self.cuda = any(device.type == "cuda" for _, _, device, _ in self.kinds)
        self.plan = FilePlan.build(tensors) if plan is None else plan
        self.batches = list(batches(self.plan, tensors, RUN_BYTES))
        base = self.plan.data_start
        self.offsets = [s.begin - base for s in self.plan.spans] + [self.plan.data_bytes]
        """Each span's start relative to the data section, then the section's end."""
        self._names = [s.name for s in self.plan.spans]
        self._cached: dict[int, tuple[list[torch.Tensor], list[int]]] = {}  # batch's first span -> views, addresses

    def matches(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        return list(tensors) == self.names and _kinds(tensors) == self.kinds

    def sources(self, tensors: Mapping[str, torch.Tensor], batch: list[int]) -> list[torch.Tensor]:
        """Flat uint8 views of a batch's tensors (one of :attr:`batches`), in file order."""
        names = self._names
        live = [tensors[names[i]] for i in batch]
        cached = self._cached.get(batch[0])
        if cached is not None:
            views, ptrs = cached
            if (list(map(_address, live)) == ptrs and all(map(_contiguous, live)) and not any(map(_negative, live))
                    and list(map(_address, views)) == ptrs):
                return views
        views = [flat_bytes(t, names[i]) for t, i in zip(live, batch, strict=True)]
        ptrs = list(map(_address, live))
        if len(batch) > 1 and list(map(_address, views)) == ptrs:  # the views share the tensors' memory
            self._cached[batch[0]] = (views, ptrs)
        else:
            self._cached.pop(batch[0], None)
        return views

    def pieces(self, start: int, end: int) -> list[Piece]:
        """The spans overlapping the data-section bytes [start, end), clipped, relative to ``start``."""
        offsets = self.offsets
        first = max(bisect.bisect_right(offsets, start) - 1, 0)
        last = min(bisect.bisect_left(offsets, end, lo=first), len(offsets) - 1)
        return [(i, max(offsets[i], start) - start, min(offsets[i + 1], end) - start)
                for i in range(first, last) if offsets[i + 1] > start]


_address = torch.Tensor.data_ptr
_contiguous = torch.Tensor.is_contiguous
_negative = torch.Tensor.is_neg


class LayoutCache:
    """The :class:`SaveLayout` of the last save, reused while the tensors match it."""

    def __init__(self) -> None:
        self._layout: SaveLayout | None = None

    def layout_for(self, tensors: Mapping[str, torch.Tensor]) -> SaveLayout:
        layout = self._layout
        if layout is None or not layout.matches(tensors):
            self._layout = None  # the old views go before the new ones are made
            layout = self._layout = SaveLayout(tensors)
        return layout
