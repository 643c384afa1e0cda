"""The tensor dtypes a checkpoint can hold, by their safetensors names.

Validating a manifest or a header needs only the names and item sizes (:data:`ITEMSIZES`), so
``unbroken ls`` and ``verify`` never import torch; the torch dtypes (:data:`NAME_TO_DTYPE`,
:data:`DTYPE_TO_NAME`) are built on first use.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from ..errors import UnserializableStateError

if TYPE_CHECKING:
    import torch

    NAME_TO_DTYPE: dict[str, torch.dtype]
    DTYPE_TO_NAME: dict[torch.dtype, str]

__all__ = ["ITEMSIZES", "DTYPE_TO_NAME", "NAME_TO_DTYPE", "dtype_name", "torch_dtype", "itemsize"]

# (safetensors name, torch attribute, bytes per element); every one exists in torch >= 2.4 (pyproject).
_DTYPES: list[tuple[str, str, int]] = [
    ("BOOL", "bool", 1), ("U8", "uint8", 1), ("I8", "int8", 1), ("I16", "int16", 2), ("U16", "uint16", 2),
    ("I32", "int32", 4), ("U32", "uint32", 4), ("I64", "int64", 8), ("U64", "uint64", 8),
    ("F16", "float16", 2), ("BF16", "bfloat16", 2), ("F32", "float32", 4), ("F64", "float64", 8),
    ("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1),
]
#: Every dtype name the format knows, with its size in bytes: all that validation needs.
ITEMSIZES: dict[str, int] = {name: size for name, _, size in _DTYPES}


def __getattr__(name: str) -> Any:
    """``NAME_TO_DTYPE`` and ``DTYPE_TO_NAME``, built (importing torch) on first access."""
    if name == "NAME_TO_DTYPE":
        return _torch_tables()[0]
    if name == "DTYPE_TO_NAME":
        return _torch_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _torch_tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    to_dtype: dict[str, torch.dtype] = {n: getattr(torch, attr) for n, attr, _ in _DTYPES}
    return to_dtype, {dtype: n for n, dtype in to_dtype.items()}


def dtype_name(dtype: torch.dtype, where: str) -> str:
    """The safetensors name of ``dtype``, or a clear error for a dtype the format cannot hold."""
    try:
        return _torch_tables()[1][dtype]
    except KeyError:
        raise UnserializableStateError(
            f"{where}: tensors of dtype {dtype} cannot be stored in a safetensors file. "
            f"Fix: convert it (e.g. .view(torch.float32) for complex64). Supported: {sorted(ITEMSIZES)}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a (validated) dtype name; imports torch."""
    return _torch_tables()[0][name]


def itemsize(name: str) -> int:
    return ITEMSIZES[name]
