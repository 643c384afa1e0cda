"""The tensor dtypes a checkpoint can hold, by their safetensors names."""

from __future__ import annotations

import torch

from ..errors import UnserializableStateError

__all__ = ["DTYPE_TO_NAME", "NAME_TO_DTYPE", "dtype_name", "itemsize"]

_PAIRS: list[tuple[str, str]] = [
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"),
    ("I32", "int32"), ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"),
    ("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
]
# Older torch releases lack some of these dtypes (uint16/32/64 arrived in 2.3).
NAME_TO_DTYPE: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _PAIRS if isinstance(getattr(torch, attr, None), torch.dtype)
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in NAME_TO_DTYPE.items()}


def dtype_name(dtype: torch.dtype, where: str) -> str:
    """The safetensors name of ``dtype``, or a clear error for a dtype the format cannot hold."""
    try:
        return DTYPE_TO_NAME[dtype]
    except KeyError:
        raise UnserializableStateError(
            f"{where}: tensors of dtype {dtype} cannot be stored in a safetensors file. "
            f"Fix: convert it (e.g. .view(torch.float32) for complex64). Supported: {sorted(NAME_TO_DTYPE)}"
        ) from None


def itemsize(name: str) -> int:
    return NAME_TO_DTYPE[name].itemsize
