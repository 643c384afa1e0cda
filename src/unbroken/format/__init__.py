"""One checkpoint on disk: ``manifest.json`` plus safetensors tensor files; versioned, validated."""

from __future__ import annotations

from .dtypes import DTYPE_TO_NAME, NAME_TO_DTYPE, dtype_name
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

__all__ = [
    "DTYPE_TO_NAME", "NAME_TO_DTYPE", "dtype_name", "MAX_HEADER_BYTES", "PREFIX_BYTES", "TensorSpan",
    "build_header", "header_length", "parse_header", "FORMAT_VERSION", "MANIFEST_NAME", "MAX_MANIFEST_BYTES",
    "FileEntry", "Manifest", "TensorEntry", "ShardEntry", "ShardedTensor", "check_file_name", "seal",
]
