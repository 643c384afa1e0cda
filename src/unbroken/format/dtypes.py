"""The tensor dtypes a checkpoint can hold, by their safetensors names.

Validating a manifest or a header needs only the names and item sizes (:data:`ITEMSIZES`), so
``unbroken ls`` and ``verify`` never import torch; the torch dtypes (:data:`NAME_TO_DTYPE`,
:data:`DTYPE_TO_NAME`) are built on first use.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from ..errors import UnserializableStateError, UnsupportedFormatError

if TYPE_CHECKING:
    import torch

    NAME_TO_DTYPE: dict[str, torch.dtype]
    DTYPE_TO_NAME: dict[torch.dtype, str]

__all__ = ["ITEMSIZES", "DTYPE_TO_NAME", "NAME_TO_DTYPE", "dtype_name", "torch_dtype", "itemsize", "check_storable"]

# (safetensors name, torch attribute, bytes per element): every dtype of the safetensors format that has
# a torch dtype with the same layout.  The format's others: F4 (counted in 4-bit elements, while torch's
# float4_e2m1fn_x2 counts bytes of two) and F6_E2M3/F6_E3M2 (no torch dtype).  Safetensors has no
# complex128 and no complex32.  A torch without one of the newer float8 dtypes still validates
# checkpoints holding it (ITEMSIZES); it only cannot load those tensors (:func:`torch_dtype`).
_DTYPES: list[tuple[str, str, int]] = [
    ("BOOL", "bool", 1), ("U8", "uint8", 1), ("I8", "int8", 1), ("I16", "int16", 2), ("U16", "uint16", 2),
    ("I32", "int32", 4), ("U32", "uint32", 4), ("I64", "int64", 8), ("U64", "uint64", 8),
    ("F16", "float16", 2), ("BF16", "bfloat16", 2), ("F32", "float32", 4), ("F64", "float64", 8),
    ("C64", "complex64", 8),
    ("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", 1), ("F8_E5M2FNUZ", "float8_e5m2fnuz", 1), ("F8_E8M0", "float8_e8m0fnu", 1),
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

    to_dtype: dict[str, torch.dtype] = {n: getattr(torch, attr) for n, attr, _ in _DTYPES if hasattr(torch, attr)}
    return to_dtype, {dtype: n for n, dtype in to_dtype.items()}


def dtype_name(dtype: torch.dtype, where: str) -> str:
    """The safetensors name of ``dtype``, or a clear error for a dtype the format cannot hold."""
    try:
        return _torch_tables()[1][dtype]
    except KeyError:
        raise UnserializableStateError(f"{where}: {_dtype_advice(dtype)}") from None


def _dtype_advice(dtype: torch.dtype) -> str:
    """Why a tensor of ``dtype`` cannot be stored, and what to save instead (each way checked to keep every bit)."""
    import torch

    name = str(dtype).removeprefix("torch.")
    if dtype.is_complex:  # complex64 is stored; these two have no safetensors dtype
        real = {torch.complex128: "float64", torch.complex32: "float16"}.get(dtype, "real")
        return (f"safetensors has no {name} dtype. Fix: save torch.view_as_real(t) ({real}, a last dimension of "
                "2 for the real and imaginary parts) and rebuild it with torch.view_as_complex(...), or store "
                "t.to(torch.complex64) if that precision is enough.")
    if name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4"):
        return f"{name} is a quantized dtype. Fix: {_QUANTIZED_FIX}"
    if dtype == getattr(torch, "float4_e2m1fn_x2", None):
        return ("safetensors' F4 counts 4-bit values where torch.float4_e2m1fn_x2 counts bytes of two, and "
                "unbroken does not translate between them. Fix: save t.view(torch.uint8) (the same bytes and "
                "shape) and view it back with .view(torch.float4_e2m1fn_x2) after loading.")
    if dtype.itemsize == 1:  # bits8, bits1x8..bits4x2, int1..int7, uint1..uint7
        return (f"safetensors has no dtype with the layout of {name}. Fix: save t.view(torch.uint8) (the same "
                f"bytes and shape) and view it back with .view(torch.{name}) after loading.")
    return f"safetensors has no {name} dtype. Fix: convert it to one of {_supported()}."


_QUANTIZED_FIX = ("save t.int_repr() (its integers) with its quantization parameters (t.q_scale() and "
                  "t.q_zero_point(), or t.q_per_channel_scales(), t.q_per_channel_zero_points() and "
                  "t.q_per_channel_axis()) and rebuild it after loading, or save t.dequantize() (floats).")


def _supported() -> str:
    return ", ".join(str(dtype) for dtype in _torch_tables()[1])


def check_storable(tensor: torch.Tensor, where: str) -> str:
    """The safetensors dtype name of ``tensor``, or an error that says why its kind of tensor has no
    raw bytes to store and what to save instead."""
    import torch

    problem = None
    if tensor.is_quantized:
        problem = f"a quantized tensor ({tensor.dtype}) is integers plus a scale and zero point. Fix: {_QUANTIZED_FIX}"
    elif tensor.is_nested:
        problem = ("a nested tensor has no single shape. Fix: save list(t.unbind()) (its tensors; rebuild with "
                   "torch.nested.nested_tensor(...)), or torch.nested.to_padded_tensor(t, 0.0) with the lengths.")
    elif tensor.layout in _sparse_layouts():
        problem = (f"a sparse tensor ({tensor.layout}) has no dense bytes. Fix: save t.to_dense(), or its parts "
                   "(t.coalesce().indices() and .values() for COO; crow_indices(), col_indices() and values() for "
                   "CSR) and rebuild it with torch.sparse_coo_tensor / torch.sparse_csr_tensor.")
    elif tensor.layout != torch.strided:
        problem = f"a tensor with layout {tensor.layout} has no plain bytes. Fix: save t.to_dense()."
    elif tensor.device.type == "meta":
        problem = ("a meta tensor has a shape and dtype but no data. Fix: materialize it (e.g. "
                   "module.to_empty(device='cpu') and load or initialize its weights) before saving, or leave it "
                   "out of the state.")
    if problem is not None:
        raise UnserializableStateError(f"{where}: {problem}")
    return dtype_name(tensor.dtype, where)


@cache
def _sparse_layouts() -> frozenset[Any]:
    import torch

    return frozenset({torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc})


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a (validated) dtype name; imports torch."""
    try:
        return _torch_tables()[0][name]
    except KeyError:
        import torch

        attr = next(attr for n, attr, _ in _DTYPES if n == name)
        raise UnsupportedFormatError(
            f"the checkpoint holds {name} tensors, and this torch ({torch.__version__}) has no torch.{attr}. "
            "Fix: load it with a newer torch.") from None


def itemsize(name: str) -> int:
    return ITEMSIZES[name]
