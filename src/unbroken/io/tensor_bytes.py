"""Raw bytes of a tensor, without copying when it is already a dense CPU tensor."""

from __future__ import annotations

from typing import Any

import torch

from ..format import check_storable

__all__ = ["host_tensor", "byte_view", "dense_values"]


def dense_values(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """The tensor's plain values on its own device (conjugate/negative views resolved), or a clear
    error for a layout that has no raw bytes."""
    check_storable(tensor, where)
    return tensor.detach().resolve_conj().resolve_neg()


def host_tensor(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """A dense, contiguous CPU tensor with the same values (the same object when it already is one)."""
    tensor = dense_values(tensor, where)
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory (no copy)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat: Any = tensor.reshape(-1).view(torch.uint8).numpy()
    return memoryview(flat)
