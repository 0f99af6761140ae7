"""Fixed scan orders (``model.scan``) for any h x w grid: the raster index decoded i-th, the same for every sample.

RAR's paper lists spiral in/out, z-curve, subsample and alternate among the fixed scans it ablates against, but
publishes neither code nor exact definitions, so every definition below is OURS (chosen here, stated precisely,
defined for every grid h x w >= 1 x 1, non-square and non-power-of-two included). Each 4x4 picture shows the
decode index of each cell (the inverse of the permutation ``scan_order`` returns):

  raster        column        snake         diagonal      alternate
   0  1  2  3    0  4  8 12    0  1  2  3    0  1  3  6    0  1  5  6
   4  5  6  7    1  5  9 13    7  6  5  4    2  4  7 10    2  4  7 12
   8  9 10 11    2  6 10 14    8  9 10 11    5  8 11 13    3  8 11 13
  12 13 14 15    3  7 11 15   15 14 13 12    9 12 14 15    9 10 14 15

  spiral_in     spiral_out    zcurve        hilbert       subsample
   0  1  2  3   15 14 13 12    0  1  4  5    0  1 14 15    0  4  1  5
  11 12 13  4    4  3  2 11    2  3  6  7    3  2 13 12    8 12  9 13
  10 15 14  5    5  0  1 10    8  9 12 13    4  7  8 11    2  6  3  7
   9  8  7  6    6  7  8  9   10 11 14 15    5  6  9 10   10 14 11 15

- raster: row-major. column: column-major.
- snake: boustrophedon over rows; even rows left -> right, odd rows right -> left.
- diagonal: anti-diagonals d = r + c in increasing d; each one walked from its top-right end to its bottom-left
  end (increasing row).
- alternate: JPEG zigzag over anti-diagonals: even d walked bottom-left -> top-right (decreasing row), odd d
  top-right -> bottom-left (increasing row); on 8x8 this is the JPEG table 0, 1, 8, 16, 9, 2, ...
- spiral_in: clockwise from the top-left corner inwards (top row, right column, bottom row backwards, left column
  upwards, then the next ring). spiral_out: spiral_in reversed (starts in the centre, ends at the top-left corner).
- zcurve: Morton order; the code of (r, c) interleaves the bits of r and c with c as the lowest bit. On other
  grids than 2^k x 2^k the cells are sorted by their Morton code (the missing cells of the enclosing power-of-two
  square are skipped), which is still a permutation but jumps where the square was cut.
- hilbert: a generalized Hilbert ("gilbert") curve for any rectangle: split the long side when the rectangle is
  long (2w > 3h), else the classic U of three sub-rectangles; sub-sizes are kept even where possible so the pieces
  join. From the top-left corner to the far end of the side it runs along; the standard Hilbert curve on
  2^k x 2^k. That side is the even one when exactly one side is even (else the longer one): by checkerboard
  parity, an odd side with an even other side would force one diagonal step. With that choice every step is
  4-adjacent on every grid up to 40 x 40 (checked exhaustively; odd x odd included).
- subsample: the four 2x2 phases one after the other, (r % 2, c % 2) = (0,0), (0,1), (1,0), (1,1), each in raster
  order (four interleaved quarter-resolution images).
- fixed_random: one permutation from ``torch.Generator().manual_seed(seed)`` (torch.randperm), shared by every
  sample: a fixed but structureless order.

Shapes: N = h * w; orders are long [N] of raster indices r * w + c.
"""
from __future__ import annotations

from functools import lru_cache

import torch

SCANS: tuple[str, ...] = ("raster", "column", "snake", "diagonal", "spiral_in", "spiral_out", "zcurve", "hilbert",
                          "subsample", "alternate", "fixed_random")


def scan_order(name: str, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """long [N] (N = h*w): the raster index (row*w + col) decoded i-th. A permutation of range(N).

    ``seed`` only matters for ``fixed_random``. The result is a fresh tensor (the cache keeps its own copy)."""
    if name not in SCANS:
        raise ValueError(f"model.scan: unknown scan {name!r} (choose from {list(SCANS)})")
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1:
        raise ValueError(f"model.scan: grid must be at least 1x1, got {h}x{w}")
    # seed is irrelevant for the deterministic scans: keep it out of their cache key
    return _cached(name, h, w, int(seed) if name == "fixed_random" else 0).clone()


@lru_cache(maxsize=256)
def _cached(name: str, h: int, w: int, seed: int) -> torch.Tensor:
    order = _BUILDERS[name](h, w, seed)
    assert order.shape == (h * w,) and order.dtype == torch.long
    return order


def _coords(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) long [N] of the raster cells."""
    idx = torch.arange(h * w)
    return idx // w, idx % w


def _sort_by(key: torch.Tensor) -> torch.Tensor:
    """Raster indices sorted by an integer key [N] (keys are unique here, stable anyway)."""
    return torch.sort(key, stable=True).indices


def _raster(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.arange(h * w)


def _column(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.arange(h * w).view(h, w).t().flatten()


def _snake(h: int, w: int, seed: int) -> torch.Tensor:
    grid = torch.arange(h * w).view(h, w).clone()
    grid[1::2] = grid[1::2].flip(1)
    return grid.flatten()


def _diagonal(h: int, w: int, seed: int) -> torch.Tensor:
    r, c = _coords(h, w)
    return _sort_by((r + c) * h + r)  # anti-diagonal first, then increasing row (top-right end first)


def _alternate(h: int, w: int, seed: int) -> torch.Tensor:
    r, c = _coords(h, w)
    d = r + c
    walk = torch.where(d % 2 == 1, r, h - 1 - r)  # odd d: rows down; even d: rows up (JPEG)
    return _sort_by(d * h + walk)


def _spiral_in(h: int, w: int, seed: int) -> torch.Tensor:
    out: list[int] = []
    top, bottom, left, right = 0, h - 1, 0, w - 1
    while top <= bottom and left <= right:
        out += [top * w + c for c in range(left, right + 1)]
        out += [r * w + right for r in range(top + 1, bottom + 1)]
        if top < bottom:  # a one-row ring has no bottom row to walk back along
            out += [bottom * w + c for c in range(right - 1, left - 1, -1)]
        if left < right:  # a one-column ring has no left column to walk up
            out += [r * w + left for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return torch.tensor(out, dtype=torch.long)


def _spiral_out(h: int, w: int, seed: int) -> torch.Tensor:
    return _spiral_in(h, w, seed).flip(0)


def _zcurve(h: int, w: int, seed: int) -> torch.Tensor:
    r, c = _coords(h, w)
    code = torch.zeros_like(r)
    for bit in range(max(h, w).bit_length()):
        code |= ((c >> bit) & 1) << (2 * bit)  # column bits at the even (low) positions
        code |= ((r >> bit) & 1) << (2 * bit + 1)
    return _sort_by(code)


def _hilbert(h: int, w: int, seed: int) -> torch.Tensor:
    cells: list[tuple[int, int]] = []
    # The curve runs from (0, 0) to the far end of its major side. Checkerboard parity: a 4-adjacent path between
    # the two ends of a side has an odd number of cells iff that side is odd, so when exactly one side is even it
    # must be the major side (else one diagonal step is forced); otherwise take the longer side.
    along_rows = (h % 2 == 0) if h % 2 != w % 2 else h > w
    if along_rows:
        _gilbert(cells, (0, 0), (1, 0), (0, 1), h, w)
    else:
        _gilbert(cells, (0, 0), (0, 1), (1, 0), w, h)
    return torch.tensor([r * w + c for r, c in cells], dtype=torch.long)


def _gilbert(cells: list, start: tuple[int, int], u: tuple[int, int], v: tuple[int, int], length: int,
             depth: int) -> None:
    """Append the cells start + i*u + j*v (0 <= i < length, 0 <= j < depth) in generalized-Hilbert order.

    u, v: orthogonal unit (row, col) steps along the major and the minor side. The path enters at ``start`` and
    leaves at the far end of the major side, start + (length-1)*u, so the pieces below chain end to start."""
    def at(i: int, j: int) -> tuple[int, int]:
        return start[0] + i * u[0] + j * v[0], start[1] + i * u[1] + j * v[1]

    if depth == 1:
        cells.extend(at(i, 0) for i in range(length))
        return
    if length == 1:  # only reached inside a U whose sides are both short: a line along the minor side
        cells.extend(at(0, j) for j in range(depth))
        return
    neg_u, neg_v = (-u[0], -u[1]), (-v[0], -v[1])
    if 2 * length > 3 * depth:
        # long rectangle: two halves along the major side, oriented like the parent. An even first half ends on
        # the minor side where the second one starts (same parity argument as in _hilbert).
        first = length // 2
        if first % 2 == 1 and length > 2:
            first += 1
        _gilbert(cells, start, u, v, first, depth)
        _gilbert(cells, at(first, 0), u, v, length - first, depth)
        return
    # the U: up the near strip of the first half (axes swapped), across the whole far strip, down the second half
    near = depth // 2
    if near % 2 == 1 and depth > 2:  # an even climb ends next to the far strip's start
        near += 1
    half = length // 2
    _gilbert(cells, start, v, u, near, half)
    _gilbert(cells, at(0, near), u, v, length, depth - near)
    _gilbert(cells, at(length - 1, near - 1), neg_v, neg_u, near, length - half)


def _subsample(h: int, w: int, seed: int) -> torch.Tensor:
    r, c = _coords(h, w)
    phase = (r % 2) * 2 + c % 2
    return _sort_by(phase * (h * w) + torch.arange(h * w))


def _fixed_random(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))


_BUILDERS = {"raster": _raster, "column": _column, "snake": _snake, "diagonal": _diagonal, "alternate": _alternate,
             "spiral_in": _spiral_in, "spiral_out": _spiral_out, "zcurve": _zcurve, "hilbert": _hilbert,
             "subsample": _subsample, "fixed_random": _fixed_random}
assert set(_BUILDERS) == set(SCANS)
