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


def cover_problem(boxes: Sequence[Box], whole: Box, pairwise_up_to: int = 1) -> str | None:
    """None if ``boxes`` (each already known to lie inside ``whole``) cover ``whole`` exactly once, else
    what is wrong.  Up to ``pairwise_up_to`` pieces are compared pair by pair; more are sorted (pieces
    split along one dimension) or counted on the grid."""
    pieces = [box for box in boxes if math.prod(box[1])]  # an empty piece covers nothing
    total, wanted = sum(math.prod(shape) for _, shape in pieces), math.prod(whole[1])
    if total != wanted:
        return f"the pieces hold {total} elements, not the {wanted} of the whole"
    # Disjoint pieces inside the whole with as many elements as it cover every element once.
    if len(pieces) <= pairwise_up_to:
        return next((_clash(a, b) for i, a in enumerate(pieces) for b in pieces[i + 1:] if _overlaps(a, b)), None)
    split = [dim for dim, (start, size) in enumerate(zip(*whole, strict=True))
             if any(offsets[dim] != start or shape[dim] != size for offsets, shape in pieces)]
    if len(split) <= 1:  # the common layouts (FSDP, tensor parallel): slabs, each in order after the last
        ordered = sorted(pieces, key=lambda box: [box[0][dim] for dim in split])
        return next((_clash(a, b) for a, b in zip(ordered, ordered[1:])
                     if not split or b[0][split[0]] < a[0][split[0]] + a[1][split[0]]), None)
    return _grid_problem(pieces, whole, split)


def _overlaps(a: Box, b: Box) -> bool:
    return all(max(ao, bo) < min(ao + an, bo + bn) for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True))


def _clash(a: Box, b: Box) -> str:
    return f"the pieces at {list(a[0])}+{list(a[1])} and at {list(b[0])}+{list(b[1])} overlap"


def _grid_problem(pieces: list[Box], whole: Box, split: list[int]) -> str | None:
    """Mark each piece's cells of the grid that the pieces' boundaries cut ``whole`` into (along the
    ``split`` dimensions); a cell marked twice is an overlap.  Each cell is marked at most once before
    this returns, so the work is at most the number of cells."""
    cuts = []
    for dim in split:
        points = {whole[0][dim], whole[0][dim] + whole[1][dim]}
        for offsets, shape in pieces:
            points.add(offsets[dim])
            points.add(offsets[dim] + shape[dim])
        cuts.append({point: index for index, point in enumerate(sorted(points))})
    sizes = [len(cut) - 1 for cut in cuts]
    cells = math.prod(sizes)
    if cells > MAX_CELLS_PER_PIECE * len(pieces):
        return (f"the {len(pieces)} pieces do not form a grid (their boundaries cut the whole into {cells} "
                f"cells, over {MAX_CELLS_PER_PIECE} per piece): not a layout unbroken writes")
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    owner = [-1] * cells
    for number, (offsets, shape) in enumerate(pieces):
        spans = [range(cut[offsets[dim]], cut[offsets[dim] + shape[dim]]) for cut, dim in zip(cuts, split)]
        for cell in itertools.product(*spans):
            flat = sum(i * stride for i, stride in zip(cell, strides))
            if owner[flat] >= 0:
                return _clash(pieces[owner[flat]], (offsets, shape))
            owner[flat] = number
    return None
