"""Two tensors of one dtype and shape, element by element: how many differ, and by how much.

Rules (docs/DIFF.md):

* ``atol == 0`` (the default) is **bitwise**: an element is equal only when its bytes are.  So NaN
  equals NaN with the same bits, while ``-0.0`` vs ``0.0`` (and NaNs with other payloads) differ,
  with an absolute difference of 0.
* ``atol > 0`` applies to floating-point (and complex) tensors: an element is equal when its bytes
  are, when both are NaN, or when ``|a - b| <= atol``.  Integer and bool tensors stay exact.
* ``max_abs`` is the largest ``|a - b|``, ``max_rel`` the largest ``|a - b| / max(|b|, tiny)``, where
  ``tiny`` is the smallest positive normal value of the dtype (``torch.finfo(dtype).tiny``; 1 for
  integers and bool), both over all elements, computed in float64 (complex128).  A difference
  involving a NaN on one side only is NaN; one involving an infinity is inf.  Integers beyond 2**53
  lose precision in float64; an unequal pair never reports 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Comparison", "compare_tensors"]

# Elements compared per step: the temporaries of one step stay near 100 MB whatever the tensor.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Comparison:
    elements: int
    differing: int
    """Elements that are not equal under the rules above."""
    max_abs: float | None
    """None when the dtype cannot be converted to float64 on this torch (then only ``differing`` is known)."""
    max_rel: float | None


def compare_tensors(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> Comparison:
    """Compare ``a`` and ``b`` (same dtype and shape, CPU, contiguous).  Only the elements whose bits
    differ are widened to float64: comparing two nearly equal tensors costs little more than reading them."""
    import torch

    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    n = flat_a.numel()
    if n == 0 or torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8)):
        return Comparison(n, 0, 0.0, 0.0)
    differing, max_abs, max_rel = 0, 0.0, 0.0
    known = True
    for start in range(0, n, _CHUNK):
        bits_a, bits_b = _bits(flat_a[start:start + _CHUNK]), _bits(flat_b[start:start + _CHUNK])
        unequal = bits_a != bits_b
        where = (unequal if unequal.dim() == 1 else unequal.any(dim=1)).nonzero().squeeze(1)
        if where.numel() == 0:
            continue
        part_a, part_b = _typed(bits_a[where], a.dtype), _typed(bits_b[where], a.dtype)
        try:
            bad, abs_part, rel_part = _numeric(part_a, part_b, atol)
        except (RuntimeError, TypeError):  # a dtype without float64 conversion on this torch: count only
            known, bad = False, where.numel()
        else:
            max_abs, max_rel = _max(max_abs, abs_part), _max(max_rel, rel_part)
        differing += bad
    if not known:
        return Comparison(n, differing, None, None)
    return Comparison(n, differing, max_abs, max_rel)


_INTS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """The elements' bits as integers of their size (one row of two int64 for 16-byte elements):
    compared with ``!=`` and indexed with every torch, whatever the element dtype."""
    import torch

    size = flat.element_size()
    if size in _INTS:
        return flat.view(getattr(torch, _INTS[size]))
    return flat.view(torch.int64).view(-1, size // 8)


def _typed(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.view(dtype).reshape(-1)


def _numeric(a: torch.Tensor, b: torch.Tensor, atol: float) -> tuple[int, float, float]:
    """(how many differ, max |a-b|, max relative difference) of elements whose bits all differ."""
    import torch

    wide = torch.complex128 if a.is_complex() else torch.float64
    wide_a, wide_b = a.to(wide), b.to(wide)
    diff = (wide_a - wide_b).abs()
    if a.is_floating_point() or a.is_complex():
        both_nan = wide_a.isnan() & wide_b.isnan()
        diff[both_nan] = 0.0  # NaNs of other payloads: unequal bitwise, but no distance between them
        bad = int((~(both_nan | (diff <= atol))).sum()) if atol > 0 else a.numel()
        tiny = torch.finfo(a.dtype).tiny
    else:
        diff[diff == 0] = 1.0  # int64 beyond 2**53 rounded equal: unequal integers are 1 apart
        bad, tiny = a.numel(), 1.0
    rel = diff / wide_b.abs().clamp(min=tiny)
    rel = torch.where(diff.isinf(), diff, rel)  # inf / inf would read as NaN
    return bad, float(diff.max()), float(rel.max())


def _max(current: float, new: float) -> float:
    """The maximum, NaN as soon as either is (a NaN difference must not be hidden by a later chunk)."""
    if math.isnan(current) or math.isnan(new):
        return math.nan
    return max(current, new)
