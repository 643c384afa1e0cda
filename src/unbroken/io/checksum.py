"""CRC32C checksums: hardware-accelerated (SSE4.2 / ARMv8) and computed without holding the GIL."""

from __future__ import annotations

import crc32c as _crc32c

__all__ = ["crc32c"]


def crc32c(data: memoryview | bytes, value: int = 0) -> int:
    """The CRC32C of ``data``, continuing from ``value`` (the CRC of the bytes before it)."""
    return _crc32c.crc32c(data, value)
