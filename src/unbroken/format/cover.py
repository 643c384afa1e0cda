"""Whether boxes tile a box exactly once, checked without allocating anything of the box's size.

The pieces of a sharded tensor come from an untrusted manifest: a reader must know that they cover
the whole tensor once (no element left uninitialised, none written twice) before it allocates the
whole.  Counting elements with a mask of the tensor's shape would let a 12 KB manifest that declares
a [2**20, 2**20] tensor allocate a terabyte, so coverage is counted on the grid that the pieces' own
boundaries cut the box into: one byte per grid cell.

The pieces of a real save form such a grid, one cell each (every DTensor placement splits each
dimension at the same points on every rank), so the grid has as many cells as there are pieces.  A
layout whose grid has more than :data:`MAX_CELLS_PER_PIECE` cells per piece is refused as not a
layout unbroken writes; that bound keeps the work linear in the size of the manifest.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = ["Box", "cover_problem", "MAX_CELLS_PER_PIECE"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape)

MAX_CELLS_PER_PIECE = 4


def cover_problem(boxes: Sequence[Box], whole: Box, pairwise_up_to: int = 8) -> str | None:
    """None if ``boxes`` (each already known to lie inside ``whole``) cover ``whole`` exactly once, else
    what is wrong.  Up to ``pairwise_up_to`` pieces are compared pair by pair; more go on the grid."""
    pieces = [box for box in boxes if math.prod(box[1])]  # an empty piece covers nothing
    total, wanted = sum(math.prod(shape) for _, shape in pieces), math.prod(whole[1])
    if total != wanted:
        return f"the pieces hold {total} elements, not the {wanted} of the whole"
    # Disjoint pieces inside the whole with as many elements as it cover every element once.
    if len(pieces) <= pairwise_up_to:
        return next((_clash(a, b) for i, a in enumerate(pieces) for b in pieces[i + 1:] if _overlaps(a, b)), None)
    return _grid_problem(pieces, whole)


def _overlaps(a: Box, b: Box) -> bool:
    return all(max(ao, bo) < min(ao + an, bo + bn) for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True))


def _clash(a: Box, b: Box) -> str:
    return f"the pieces at {list(a[0])}+{list(a[1])} and at {list(b[0])}+{list(b[1])} overlap"


def _grid_problem(pieces: list[Box], whole: Box) -> str | None:
    """Mark each piece's cells of the grid that the pieces' boundaries cut ``whole`` into; a cell
    marked twice is an overlap.  Each cell is marked at most once before this returns: work <= cells."""
    cuts = []
    for dim in range(len(whole[1])):
        points = sorted({whole[0][dim], whole[0][dim] + whole[1][dim]}
                        | {p[0][dim] for p in pieces} | {p[0][dim] + p[1][dim] for p in pieces})
        cuts.append({point: index for index, point in enumerate(points)})
    sizes = [len(c) - 1 for c in cuts]
    cells = math.prod(sizes)
    if cells > MAX_CELLS_PER_PIECE * len(pieces):
        return (f"the {len(pieces)} pieces do not form a grid (their boundaries cut the whole into {cells} "
                f"cells, over {MAX_CELLS_PER_PIECE} per piece): not a layout unbroken writes")
    strides = [math.prod(sizes[dim + 1:]) for dim in range(len(sizes))]
    owner = [-1] * cells
    for number, (offsets, shape) in enumerate(pieces):
        spans = [range(cut[o], cut[o + n]) for cut, o, n in zip(cuts, offsets, shape, strict=True)]
        for cell in itertools.product(*spans):
            flat = sum(i * s for i, s in zip(cell, strides, strict=True))
            if owner[flat] >= 0:
                return _clash(pieces[owner[flat]], (offsets, shape))
            owner[flat] = number
    return None
