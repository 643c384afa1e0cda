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

from ..errors import UnserializableStateError
from ..format import TensorSpan, build_header, dtype_name
from .tensor_bytes import byte_view, host_tensor

__all__ = ["FilePlan", "Run", "live_runs", "flat_bytes"]

Piece = tuple[int, int, int]
Run = tuple[memoryview, list[Piece]]


@dataclass(frozen=True)
class FilePlan:
    header: bytes
    spans: list[TensorSpan]

    @classmethod
    def build(cls, tensors: Mapping[str, torch.Tensor]) -> FilePlan:
        header, spans = build_header([(n, dtype_name(t.dtype, n), tuple(t.shape)) for n, t in tensors.items()])
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


def live_runs(plan: FilePlan, tensors: Mapping[str, torch.Tensor]) -> Iterator[Run]:
    """Stream straight from tensor memory (a device tensor is copied to the host one at a time)."""
    for index, span in enumerate(plan.spans):
        data = byte_view(host_tensor(tensors[span.name], span.name))
        yield data, [(index, 0, len(data))]


def flat_bytes(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """A flat uint8 view of a tensor's values on its own device (a contiguous copy only if needed)."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        raise UnserializableStateError(
            f"{where}: {tensor.layout} / quantized / meta tensors cannot be saved as raw bytes. "
            "Fix: convert it to a dense tensor (e.g. .to_dense()) before saving.")
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8)
