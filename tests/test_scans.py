"""Fixed scan orders (lightning_modules/scans.py): permutations on every grid, the exact small cases of our
definitions, the JPEG zigzag, and the path properties (spiral, snake and Hilbert steps are 4-adjacent)."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.scans import SCANS, scan_order

torch.set_num_threads(1)
GRIDS = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (3, 3), (5, 7), (7, 5), (4, 4), (8, 8), (6, 10), (16, 16), (24, 24)]
SMALL = [(h, w) for h in range(1, 13) for w in range(1, 13)]  # every parity and aspect-ratio combination
# libjpeg's jpeg_natural_order (ITU T.81 figure A.6): zigzag position i -> raster index on 8x8
JPEG_ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,
               7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31,
               39, 46, 53, 60, 61, 54, 47, 55, 62, 63]


def steps(order: torch.Tensor, w: int) -> torch.Tensor:
    """Manhattan distance long [N-1] between consecutive cells of an order."""
    r, c = order // w, order % w
    return r.diff().abs() + c.diff().abs()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", SCANS)
def test_every_scan_is_a_deterministic_permutation(name, grid):
    N = grid[0] * grid[1]
    order = scan_order(name, grid)
    assert order.dtype == torch.long and order.shape == (N,)
    assert torch.equal(order.sort().values, torch.arange(N))
    assert torch.equal(order, scan_order(name, grid))


def test_result_is_a_copy_callers_may_mutate():
    a = scan_order("hilbert", (4, 4))
    a.zero_()
    assert torch.equal(scan_order("hilbert", (4, 4)).sort().values, torch.arange(16))


@pytest.mark.parametrize("grid", GRIDS)
def test_raster_and_column(grid):
    h, w = grid
    assert scan_order("raster", grid).tolist() == list(range(h * w))
    assert scan_order("column", grid).tolist() == [r * w + c for c in range(w) for r in range(h)]


def test_small_cases_exact():
    assert scan_order("column", (2, 3)).tolist() == [0, 3, 1, 4, 2, 5]
    assert scan_order("spiral_in", (3, 3)).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert scan_order("spiral_in", (4, 4)).tolist() == [0, 1, 2, 3, 7, 11, 15, 14, 13, 12, 8, 4, 5, 6, 10, 9]
    assert scan_order("spiral_in", (2, 3)).tolist() == [0, 1, 2, 5, 4, 3]
    assert scan_order("spiral_out", (3, 3)).tolist() == [4, 3, 6, 7, 8, 5, 2, 1, 0]
    assert scan_order("zcurve", (4, 4)).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert scan_order("subsample", (4, 4)).tolist() == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    assert scan_order("snake", (3, 3)).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    assert scan_order("diagonal", (3, 3)).tolist() == [0, 1, 3, 2, 4, 6, 5, 7, 8]
    assert scan_order("alternate", (3, 3)).tolist() == [0, 1, 3, 6, 4, 2, 5, 7, 8]


def test_alternate_is_the_jpeg_zigzag_on_8x8():
    assert scan_order("alternate", (8, 8)).tolist() == JPEG_ZIGZAG


@pytest.mark.parametrize("grid", [(5, 7), (7, 5), (6, 10), (1, 4)])
@pytest.mark.parametrize("name", ["diagonal", "alternate"])
def test_anti_diagonals_in_order_and_walked_as_defined(name, grid):
    h, w = grid
    order = scan_order(name, grid)
    r, c = order // w, order % w
    d = r + c
    assert bool((d.diff() >= 0).all())  # anti-diagonal by anti-diagonal
    for k in range(h + w - 1):
        rows = r[d == k]
        down = name == "diagonal" or k % 2 == 1  # diagonal: always top-right -> bottom-left
        assert rows.tolist() == sorted(rows.tolist(), reverse=not down)


@pytest.mark.parametrize("grid", SMALL + GRIDS)
@pytest.mark.parametrize("name", ["spiral_in", "spiral_out", "snake", "hilbert"])
def test_paths_only_take_4_adjacent_steps(name, grid):
    # hilbert: stronger than "at most a few diagonal steps on odd x odd": the major side is chosen by parity
    order = scan_order(name, grid)
    assert bool((steps(order, grid[1]) == 1).all()), steps(order, grid[1]).tolist()


@pytest.mark.parametrize("grid", SMALL + GRIDS)
def test_spiral_and_hilbert_ends(grid):
    h, w = grid
    assert int(scan_order("spiral_in", grid)[0]) == 0 and int(scan_order("spiral_out", grid)[-1]) == 0
    hilbert = scan_order("hilbert", grid)
    assert int(hilbert[0]) == 0 and int(hilbert[-1]) in (w - 1, (h - 1) * w)  # the far end of one side


@pytest.mark.parametrize("grid", SMALL)
def test_spiral_in_is_clockwise_rings(grid):
    # ring = distance to the border: the spiral finishes a ring before it enters the next one
    h, w = grid
    order = scan_order("spiral_in", grid)
    r, c = order // w, order % w
    ring = torch.minimum(torch.minimum(r, h - 1 - r), torch.minimum(c, w - 1 - c))
    assert bool((ring.diff() >= 0).all())
    if h > 1 and w > 1:
        assert int(order[1]) == 1  # clockwise: right first, not down


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_hilbert_on_power_of_two_squares_visits_every_aligned_block_at_once(n):
    # the defining Hilbert property (snake, spiral and raster all fail it): each aligned s x s block is one
    # contiguous stretch of the order, at every scale s
    order = scan_order("hilbert", (n, n))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n * n)
    rank = rank.view(n, n)
    s = 2
    while s < n:
        blocks = rank.unfold(0, s, s).unfold(1, s, s).reshape(-1, s * s)
        assert bool(((blocks.max(1).values - blocks.min(1).values) == s * s - 1).all()), s
        s *= 2


@pytest.mark.parametrize("grid", [(5, 7), (7, 5), (3, 3), (6, 10), (1, 5)])
def test_zcurve_is_the_power_of_two_curve_with_missing_cells_skipped(grid):
    h, w = grid
    side = 1 << (max(h, w) - 1).bit_length()
    big = scan_order("zcurve", (side, side))
    r, c = big // side, big % side
    inside = (r < h) & (c < w)
    assert scan_order("zcurve", grid).tolist() == (r[inside] * w + c[inside]).tolist()


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (1, 6)])
def test_subsample_phases(grid):
    h, w = grid
    order = scan_order("subsample", grid)
    r, c = order // w, order % w
    phase = (r % 2) * 2 + c % 2
    assert bool((phase.diff() >= 0).all())
    for p in range(4):
        assert bool((order[phase == p].diff() > 0).all())  # raster order inside a phase


def test_fixed_random_seeds():
    a, b = scan_order("fixed_random", (8, 8), seed=0), scan_order("fixed_random", (8, 8), seed=1)
    assert torch.equal(a, scan_order("fixed_random", (8, 8), seed=0))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.randperm(64, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(scan_order("raster", (3, 3), seed=5), scan_order("raster", (3, 3)))  # seed is ignored


def test_unknown_scan_names_the_config_key():
    with pytest.raises(ValueError, match=r"^model\.scan: unknown scan 'peano' \(choose from \[") as err:
        scan_order("peano", (4, 4))
    assert "\n" not in str(err.value) and "hilbert" in str(err.value)
    with pytest.raises(ValueError, match="model.scan"):
        scan_order("raster", (0, 4))
