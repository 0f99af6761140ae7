"""The Halton decode order (lightning_modules/halton.py): the sequence itself, first-hit grid orders checked
against a slow exact reference, known-first batch orders as a pure function of the generator, and the reason to
have it: every prefix is spread more evenly than a uniformly random order's."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from lightning_modules.halton import halton_grid_order, halton_order, halton_points_needed, halton_sequence

torch.set_num_threads(1)
GRIDS = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (3, 3), (5, 7), (7, 5), (4, 4), (8, 8), (6, 10), (16, 16), (24, 24)]


def radical_inverse(i: int, base: int) -> Fraction:
    value, scale = Fraction(0), Fraction(1, base)
    while i:
        i, digit = divmod(i, base)
        value += digit * scale
        scale /= base
    return value


def reference_grid_order(h: int, w: int, offset: int) -> list[int]:
    """Slow, exact: cells by first hit of (floor(y*h), floor(x*w)), x base 2, y base 3."""
    order, seen, i = [], set(), offset
    while len(order) < h * w:
        x, y = radical_inverse(i, 2), radical_inverse(i, 3)
        cell = int(y * h) * w + int(x * w)
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
        i += 1
    return order


def test_halton_sequence_values():
    assert halton_sequence(8, 2).tolist() == [0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]
    expected = [float(radical_inverse(i, 3)) for i in range(100, 140)]
    assert torch.allclose(halton_sequence(40, 3, start=100), torch.tensor(expected, dtype=torch.float64))
    assert halton_sequence(5, 3).dtype == torch.float64


@pytest.mark.parametrize("grid,offset", [((4, 4), 0), ((5, 7), 3), ((3, 3), 8), ((2, 3), 1), ((6, 10), 37),
                                         ((1, 7), 2), ((7, 1), 5)])
def test_grid_order_matches_exact_reference(grid, offset):
    assert halton_grid_order(grid, offset).tolist() == reference_grid_order(*grid, offset)


@pytest.mark.parametrize("grid", GRIDS)
def test_grid_order_is_a_permutation_without_the_raster_fallback(grid):
    N = grid[0] * grid[1]
    stride = 1 if N <= 64 else 7  # every offset halton_order can draw on small grids, a spread of them above
    for offset in range(0, N, stride):
        order = halton_grid_order(grid, offset)
        assert torch.equal(order.sort().values, torch.arange(N))
        needed = halton_points_needed(grid, offset)
        assert needed is not None and N <= needed <= 8 * N  # covered by the sequence itself, well within the bound
    assert int(halton_grid_order(grid, 0)[0]) == 0  # point 0 is (0, 0)


def test_order_known_first_then_halton_restricted_to_unknown():
    grid, N = (8, 8), 64
    known = torch.zeros(N, dtype=torch.bool)
    known[[63, 0, 9, 18, 27]] = True
    order = halton_order(grid, [20, 20, 19], 3, torch.Generator().manual_seed(3), known)
    assert order.shape == (3, N)
    assert torch.equal(order.sort(1).values, torch.arange(N).expand(3, -1))
    assert order[:, :5].tolist() == [[0, 9, 18, 27, 63]] * 3
    offsets = torch.randint(0, N, (3,), generator=torch.Generator().manual_seed(3)).tolist()
    for row, offset in zip(order, offsets):
        expected = [p for p in halton_grid_order(grid, offset).tolist() if not known[p]]
        assert row[5:].tolist() == expected


def test_order_is_a_pure_function_of_the_generator():
    grid, N = (16, 16), 256
    a = halton_order(grid, [N], 6, torch.Generator().manual_seed(0))
    assert torch.equal(a, halton_order(grid, [N], 6, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, halton_order(grid, [N], 6, torch.Generator().manual_seed(1)))
    assert len({tuple(r) for r in a.tolist()}) > 1  # samples differ from each other
    g = torch.Generator().manual_seed(0)
    first, second = halton_order(grid, [N], 6, g), halton_order(grid, [N], 6, g)
    assert not torch.equal(first, second)  # the generator advances
    plain = halton_order(grid, [100, 156], 2, None)
    assert torch.equal(plain, halton_grid_order(grid, 0).expand(2, -1))


def neighbour_fraction(order: torch.Tensor, grid: tuple[int, int], k: int) -> float:
    """Mean over rows of the fraction of the first k cells that have a 4-neighbour among the first k."""
    h, w = grid
    chosen = torch.zeros(order.shape[0], h * w, dtype=torch.bool).scatter_(1, order[:, :k], True).view(-1, h, w)
    near = torch.zeros_like(chosen)
    near[:, 1:] |= chosen[:, :-1]
    near[:, :-1] |= chosen[:, 1:]
    near[:, :, 1:] |= chosen[:, :, :-1]
    near[:, :, :-1] |= chosen[:, :, 1:]
    return float((near & chosen).flatten(1).sum(1).float().mean()) / k


def nearest_distance(order: torch.Tensor, grid: tuple[int, int], k: int) -> float:
    """Mean distance from each of the first k cells to its nearest other one among them."""
    w = grid[1]
    first = order[:, :k]
    xy = torch.stack([first // w, first % w], -1).float()
    d = torch.cdist(xy, xy) + torch.eye(k) * 1e9
    return float(d.min(2).values.mean())


@pytest.mark.parametrize("grid", [(16, 16), (5, 7)])
def test_prefixes_spread_more_evenly_than_random_orders(grid):
    N = grid[0] * grid[1]
    halton = halton_order(grid, [N], 20, torch.Generator().manual_seed(0))
    random = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(s)) for s in range(20)])
    for k in (N // 8, N // 4):
        # e.g. 16x16, k = 64: ~0.39 of Halton's first cells touch another one vs ~0.66 for random orders
        assert neighbour_fraction(halton, grid, k) < neighbour_fraction(random, grid, k) - 0.15, k
        assert nearest_distance(halton, grid, k) > nearest_distance(random, grid, k) + 0.1, k


def test_counts_must_cover_the_unknown_positions():
    known = torch.zeros(16, dtype=torch.bool)
    known[:4] = True
    with pytest.raises(ValueError, match=r"^sample\.schedule=halton: counts sum to 16, but 12") as err:
        halton_order((4, 4), [8, 8], 1, None, known)
    assert "\n" not in str(err.value)
    assert halton_order((4, 4), [6, 6], 1, None, known).shape == (1, 16)
