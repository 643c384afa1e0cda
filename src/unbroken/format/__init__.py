"""One checkpoint on disk: ``manifest.json`` plus safetensors tensor files; versioned, validated.

Torch-free: the torch dtype tables (``NAME_TO_DTYPE``, ``DTYPE_TO_NAME``) import torch on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._internal.lazy import lazy_attributes
from .dtypes import ITEMSIZES, check_storable, dtype_name
from .header import MAX_HEADER_BYTES, PREFIX_BYTES, TensorSpan, build_header, header_length, parse_header
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    ShardedTensor,
    ShardEntry,
    TensorEntry,
    check_file_name,
    seal,
)

if TYPE_CHECKING:
    from .dtypes import DTYPE_TO_NAME, NAME_TO_DTYPE

__all__ = [
    "ITEMSIZES", "DTYPE_TO_NAME", "NAME_TO_DTYPE", "dtype_name", "check_storable", "MAX_HEADER_BYTES", "PREFIX_BYTES",
    "TensorSpan", "build_header", "header_length", "parse_header", "FORMAT_VERSION", "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "FileEntry", "Manifest", "TensorEntry", "ShardEntry", "ShardedTensor", "check_file_name", "seal",
]

# Built from torch by format.dtypes on first access.
__getattr__ = lazy_attributes(__name__, {"NAME_TO_DTYPE": "dtypes", "DTYPE_TO_NAME": "dtypes"})
