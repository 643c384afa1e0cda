"""CRC32C checksums: hardware-accelerated (SSE4.2 / ARMv8) and computed without holding the GIL.

:class:`BlockCrc` checksums a tensor per fixed-size block, so a reader can verify a byte range of
it without reading the whole tensor; :func:`crc32c_combine` derives the whole tensor's CRC from the
blocks' CRCs (zlib's ``crc32_combine`` algorithm for the Castagnoli polynomial), so the bytes are
checksummed only once.
"""

from __future__ import annotations

from functools import lru_cache

import crc32c as _crc32c

__all__ = ["crc32c", "crc32c_combine", "BlockCrc"]

_POLY = 0x82F63B78  # CRC32C, reflected


def crc32c(data: memoryview | bytes, value: int = 0) -> int:
    """The CRC32C of ``data``, continuing from ``value`` (the CRC of the bytes before it)."""
    return _crc32c.crc32c(data, value)


def _times(matrix: tuple[int, ...], vector: int) -> int:
    """``matrix · vector`` over GF(2); column ``i`` of the matrix is ``matrix[i]``."""
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _product(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(a, column) for column in b)


@lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The linear map that appends ``nbytes`` zero bytes to a CRC register."""
    one_bit = (_POLY,) + tuple(1 << n for n in range(31))
    power = _product(one_bit, one_bit)   # 2 bits
    power = _product(power, power)       # 4 bits
    power = _product(power, power)       # 1 byte
    result: tuple[int, ...] = tuple(1 << n for n in range(32))  # identity
    while nbytes:
        if nbytes & 1:
            result = _product(power, result)
        nbytes >>= 1
        if nbytes:
            power = _product(power, power)
    return result


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32C of ``A + B`` from ``crc1 = crc32c(A)``, ``crc2 = crc32c(B)`` and ``len2 = len(B)``."""
    if len2 <= 0:
        return crc1
    return _times(_zeros_operator(len2), crc1) ^ crc2


class BlockCrc:
    """CRC32C per ``block_bytes`` block of a stream fed in pieces of any size."""

    def __init__(self, block_bytes: int) -> None:
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        self.block_bytes = block_bytes
        self.blocks: list[int] = []
        self._current = 0
        self._filled = 0
        self._length = 0

    def update(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        self._length += len(view)
        while len(view):
            take = min(self.block_bytes - self._filled, len(view))
            self._current = crc32c(view[:take], self._current)
            self._filled += take
            view = view[take:]
            if self._filled == self.block_bytes:
                self.blocks.append(self._current)
                self._current, self._filled = 0, 0

    def finish(self) -> tuple[int, tuple[int, ...]]:
        """``(crc of everything, crc of each block)``; the last block may be shorter."""
        if self._filled:
            self.blocks.append(self._current)
            self._current, self._filled = 0, 0
        whole = 0
        for index, block in enumerate(self.blocks):
            size = min(self.block_bytes, self._length - index * self.block_bytes)
            whole = crc32c_combine(whole, block, size) if index else block
        return whole, tuple(self.blocks)
