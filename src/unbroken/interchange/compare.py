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

# Elements compared per step: the float64 temporaries of one step stay near 100 MB whatever the tensor.
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
    """Compare ``a`` and ``b`` (same dtype and shape, CPU, contiguous)."""
    import torch

    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    n = flat_a.numel()
    if n == 0 or torch.equal(_bytes(flat_a), _bytes(flat_b)):
        return Comparison(n, 0, 0.0, 0.0)
    differing, max_abs, max_rel = 0, 0.0, 0.0
    known = True
    for start in range(0, n, _CHUNK):
        part_a, part_b = flat_a[start:start + _CHUNK], flat_b[start:start + _CHUNK]
        same = (_bytes(part_a).view(-1, a.element_size()) == _bytes(part_b).view(-1, a.element_size())).all(dim=1)
        try:
            ok, abs_part, rel_part = _numeric(part_a, part_b, same, atol)
        except (RuntimeError, TypeError):  # a dtype without float64 conversion on this torch: count only
            known, ok = False, same
        else:
            max_abs, max_rel = _max(max_abs, abs_part), _max(max_rel, rel_part)
        differing += int((~ok).sum())
    if not known:
        return Comparison(n, differing, None, None)
    return Comparison(n, differing, max_abs, max_rel)


def _bytes(flat: torch.Tensor) -> torch.Tensor:
    import torch

    return flat.view(torch.uint8)


def _numeric(a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, atol: float
             ) -> tuple[torch.Tensor, float, float]:
    """(elements counted equal, max |a-b|, max relative difference) of one chunk."""
    import torch

    inexact = a.is_floating_point() or a.is_complex()
    wide = torch.complex128 if a.is_complex() else torch.float64
    wide_a, wide_b = a.to(wide), b.to(wide)
    diff = (wide_a - wide_b).abs()
    diff[same] = 0.0
    if inexact:
        both_nan = wide_a.isnan() & wide_b.isnan()
        diff[both_nan] = 0.0  # NaNs of other payloads: unequal bitwise, but no distance between them
        ok = same | both_nan | (diff <= atol) if atol > 0 else same
        tiny = torch.finfo(a.dtype).tiny
    else:
        diff[~same & (diff == 0)] = 1.0  # int64 beyond 2**53 rounded equal: unequal integers are 1 apart
        ok = same
        tiny = 1.0
    rel = diff / wide_b.abs().clamp(min=tiny)
    rel = torch.where(diff.isinf(), diff, rel)  # inf / inf would read as NaN
    return ok, float(diff.max()), float(rel.max())


def _max(current: float, new: float) -> float:
    """The maximum, NaN as soon as either is (a NaN difference must not be hidden by a later chunk)."""
    if math.isnan(current) or math.isnan(new):
        return math.nan
    return max(current, new)
