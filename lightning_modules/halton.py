"""Halton decode order (``sample.schedule=halton``) for orderings that decode in any order (RandAR, ARPG).

Tokens decoded in the same step are drawn independently given the context, so a step should not put two tokens
next to each other, and the context should grow evenly over the image. Besnier et al., "Halton Scheduler for
Masked Generative Image Transformer" (ICLR 2025), get both from a 2-D Halton low-discrepancy sequence (bases 2
and 3): every prefix of the order (the context so far) is spread evenly over the grid, and so is each stretch
of consecutive points (one step's tokens), whatever the tokens-per-step schedule.

This is our implementation of that idea on any h x w grid:
  - Halton point i is (x_i, y_i) = (radical inverse of i in base 2, radical inverse of i in base 3), i >= 0;
  - it hits the cell (floor(y_i * h), floor(x_i * w)), computed in exact integer arithmetic; the grid order is
    the cells by first hit, reading points from index ``offset`` on until every cell was hit. After
    MAX_POINTS_PER_CELL * N points the cells still missing would be appended in raster order: a termination
    guarantee, never needed on the tested grids, which are covered within 4N points (``halton_points_needed``);
  - per sample, the offset is drawn from the generator, so samples get different orders that are each
    low-discrepancy (a shifted window of the sequence is as evenly spread as its start).
Unlike ``sample.schedule=locality`` the order does not depend on the tokens-per-step counts; they are only
checked. Shapes: N = h*w positions in raster order, B orders.
"""
from __future__ import annotations

from functools import lru_cache

import torch

HALTON = "halton"
MAX_POINTS_PER_CELL = 64  # the fallback bound: at most 64 * N Halton points are read for one grid order
_BASES = (2, 3)  # x (columns) in base 2, y (rows) in base 3: coprime, as the sequence needs


def _radical_inverse(start: int, n: int, base: int) -> tuple[torch.Tensor, int]:
    """(numerators long [n], denominator base^D): the radical inverses of start, ..., start + n - 1 as exact
    fractions over one common denominator (D = the digits of the largest index), so that cells are found with
    integer arithmetic and no float rounding can move a point across a cell border."""
    i = torch.arange(start, start + n, dtype=torch.long)
    digits = 1
    while base ** digits <= start + n - 1:
        digits += 1
    num = torch.zeros(n, dtype=torch.long)
    for _ in range(digits):  # the digits of i, least significant first, mirrored behind the point
        num = num * base + i % base
        i = i // base
    return num, base ** digits


def halton_sequence(n: int, base: int, start: int = 0) -> torch.Tensor:
    """float64 [n]: the radical inverses in ``base`` of the integers start, ..., start + n - 1.

    Index 0 maps to 0.0 (the digits of i mirrored behind the point: base 2, i = 6 = 110b -> 0.011b = 0.375)."""
    if base < 2 or n < 0 or start < 0:
        raise ValueError(f"halton_sequence: need base >= 2, n >= 0, start >= 0; got {base}, {n}, {start}")
    num, den = _radical_inverse(start, n, base)
    return num.double() / den


def _first_hits(h: int, w: int, offset: int) -> tuple[torch.Tensor, int | None]:
    """(cells long [<= N] in order of first Halton hit, points read until all N were hit or None if the bound
    MAX_POINTS_PER_CELL * N was reached first)."""
    N = h * w
    seen = torch.zeros(N, dtype=torch.bool)
    parts: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)]
    chunk = max(64, 4 * N)  # grids are covered within a few N points: read in chunks, stop once covered
    read, budget = 0, MAX_POINTS_PER_CELL * N
    while read < budget:
        n = min(chunk, budget - read)
        x, x_den = _radical_inverse(offset + read, n, _BASES[0])
        y, y_den = _radical_inverse(offset + read, n, _BASES[1])
        cell = (y * h) // y_den * w + (x * w) // x_den  # [n]: (floor(y*h), floor(x*w)), exactly
        first = torch.full((N,), n, dtype=torch.long).scatter_reduce(0, cell, torch.arange(n), "amin")  # [N]
        new = (~seen & (first < n)).nonzero().flatten()
        new = new[first[new].argsort()]  # this chunk's new cells, by the point that first hit them
        parts.append(new)
        seen[new] = True
        if bool(seen.all()):  # new is not empty here: the chunk completed the cover
            return torch.cat(parts), read + int(first[new[-1]]) + 1
        read += n
    return torch.cat(parts), None


@lru_cache(maxsize=1024)
def _grid_order(h: int, w: int, offset: int) -> tuple[torch.Tensor, int | None]:
    """(order long [N], points needed or None): the first hits, then (fallback) the missing cells in raster order."""
    hits, needed = _first_hits(h, w, offset)
    missing = torch.ones(h * w, dtype=torch.bool)
    missing[hits] = False
    return torch.cat([hits, missing.nonzero().flatten()]), needed


def halton_points_needed(grid: tuple[int, int], offset: int = 0) -> int | None:
    """How many Halton points, read from ``offset``, hit every cell of the grid (>= N); None if the bound
    MAX_POINTS_PER_CELL * N was reached first, i.e. halton_grid_order had to append cells in raster order."""
    return _grid_order(int(grid[0]), int(grid[1]), int(offset))[1]


def halton_grid_order(grid: tuple[int, int], offset: int = 0) -> torch.Tensor:
    """long [N]: every cell once, in order of its first hit by the (2, 3) Halton points offset, offset + 1, ..."""
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or offset < 0:
        raise ValueError(f"halton_grid_order: need a grid >= 1x1 and offset >= 0, got {h}x{w}, offset {offset}")
    return _grid_order(h, w, int(offset))[0].clone()


@torch.no_grad()
def halton_order(grid: tuple[int, int], counts: list[int], batch: int, generator: torch.Generator | None,
                 known: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Orders long [B, N]: known positions first (raster order), then the unknown ones in Halton order.

    known: bool [N] or None. sum(counts) must equal N - known.sum() (checked only: counts set how many tokens a
    step decodes, not which). Sample b reads the sequence from an offset in [0, N) drawn from ``generator`` (on
    ``device``, like locality_order's); generator=None: offset 0 for every sample."""
    h, w = grid
    N = h * w
    known = torch.zeros(N, dtype=torch.bool, device=device) if known is None else known.to(device).bool()
    unknown = N - int(known.sum())
    if sum(counts) != unknown:
        raise ValueError(f"sample.schedule=halton: counts sum to {sum(counts)}, but {unknown} positions are unknown")
    if generator is None:
        offsets = [0] * batch
    else:
        offsets = torch.randint(0, N, (batch,), generator=generator, device=device).tolist()
    known_cpu = known.cpu()
    head = known_cpu.nonzero().flatten()  # raster order
    rows = []
    for offset in offsets:
        order = _grid_order(h, w, offset)[0]
        rows.append(torch.cat([head, order[~known_cpu[order]]]))  # the Halton order restricted to unknowns
    return torch.stack(rows).to(device) if rows else torch.zeros(0, N, dtype=torch.long, device=device)
