"""The layout of one tensor file, decided before any byte is written, and the byte runs that fill it.

A :class:`FilePlan` is the safetensors header plus each tensor's span.  Writers consume *runs*:
``(bytes, pieces)`` where ``bytes`` is a memoryview of the next stretch of the file's data section
and each piece ``(span index, lo, hi)`` says which span ``bytes[lo:hi]`` belongs to, so the writer
checksums per tensor while writing large stretches.  Live tensors give one run per tensor; staged
host buffers give a few large runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..format import TensorSpan, build_header, dtype_name
from .tensor_bytes import byte_view, dense_values, host_tensor

__all__ = ["FilePlan", "Run", "live_runs", "flat_bytes", "batches", "batch_bytes", "group_of"]

SMALL_TENSOR = 1 << 20
BATCH_BYTES = 64 << 20
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


def batches(plan: FilePlan, tensors: Mapping[str, torch.Tensor]) -> Iterator[list[int]]:
    """Span indices in file order, consecutive small CPU tensors of one dtype batched together, so
    thousands of tiny tensors cost a few large copies instead of thousands of small ones."""
    batch: list[int] = []
    size = 0
    for index, span in enumerate(plan.spans):
        tensor = tensors[span.name]
        small = (span.nbytes <= SMALL_TENSOR and tensor.device.type == "cpu" and tensor.dtype in _CAT_DTYPES
                 and tensor.layout == torch.strided)
        if batch and (not small or tensor.dtype != tensors[plan.spans[batch[0]].name].dtype
                      or size + span.nbytes > BATCH_BYTES):
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


def live_runs(plan: FilePlan, tensors: Mapping[str, torch.Tensor]) -> Iterator[Run]:
    """Stream from tensor memory: large tensors directly (a device tensor is copied to the host one at
    a time), small ones batched; extra memory stays under one batch (BATCH_BYTES)."""
    for batch in batches(plan, tensors):
        yield batch_bytes(plan, tensors, batch)


def flat_bytes(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """A flat uint8 view of a tensor's values on its own device (a contiguous copy only if needed)."""
    tensor = dense_values(tensor, where)
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8)
