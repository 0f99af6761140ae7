"""Draw every fixed scan (lightning_modules/scans.py) and the Halton order as one picture for the docs.

One panel per order: cells coloured by decode index (viridis), the path through the cell centres, the start
marked, and (grids up to 8x8) the index written in each cell. Halton is drawn at offset 0 (its first hits).

    python -m experiments.plot_scans --out docs/images/scans.png --grid 8x8
    python -m experiments.plot_scans --out docs/images/scans_5x7.png --grid 5x7
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image

from lightning_modules.halton import HALTON, halton_grid_order
from lightning_modules.scans import SCANS, scan_order

MAX_NUMBERED = 64  # write indices into the cells up to 8x8
COLUMNS = 4


def orders(grid: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """name -> long [N] raster indices in decode order, for every scan and Halton."""
    out = {name: scan_order(name, grid, seed) for name in SCANS}
    out[HALTON] = halton_grid_order(grid)
    return out


def draw(ax, order: torch.Tensor, grid: tuple[int, int], title: str, numbers: bool) -> None:
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection

    h, w = grid
    N = h * w
    rank = torch.empty_like(order)
    rank[order] = torch.arange(N)
    ax.imshow(rank.view(h, w).numpy(), cmap="viridis", vmin=0, vmax=max(1, N - 1), interpolation="nearest")
    rows, cols = (order // w).numpy(), (order % w).numpy()
    # steps to one of the 8 neighbours are drawn solid, jumps faint: a path (or a diagonal walk) reads as one,
    # a jumpy order as a haze
    segments = np.stack([np.stack([cols[:-1], rows[:-1]], -1), np.stack([cols[1:], rows[1:]], -1)], 1)  # [N-1,2,2]
    adjacent = np.maximum(np.abs(np.diff(rows)), np.abs(np.diff(cols))) == 1
    ax.add_collection(LineCollection(segments[adjacent], colors="white", linewidths=1.6, alpha=0.85))
    ax.add_collection(LineCollection(segments[~adjacent], colors="white", linewidths=0.7, alpha=0.35))
    ax.plot(cols[:1], rows[:1], "o", mfc="none", mec="red", mew=2, ms=13 if numbers else 8)  # a ring around 0
    if numbers:
        size = max(5.0, min(8.0, 56.0 / max(h, w)))
        outline = [patheffects.withStroke(linewidth=2, foreground="black")]  # readable over the line and colours
        for (r, c), v in np.ndenumerate(rank.view(h, w).numpy()):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=size, color="white", path_effects=outline)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def render(grid: tuple[int, int], out: str, seed: int = 0, cell: float = 0.4) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    h, w = grid
    named = orders(grid, seed)
    rows = -(-len(named) // COLUMNS)
    panel = min(4.0, max(1.6, cell * max(h, w)))  # inches for the longer side; capped for large grids
    side = max(h, w)  # the longer side gets `panel` inches, the other one its share
    fig = Figure(figsize=(panel * COLUMNS * w / side + 0.4, (panel * h / side + 0.3) * rows + 0.3), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, COLUMNS, squeeze=False).flatten()
    for ax, (name, order) in zip(axes, named.items()):
        draw(ax, order, grid, name, numbers=h * w <= MAX_NUMBERED)
    for ax in axes[len(named):]:
        ax.set_axis_off()
    fig.suptitle(f"decode orders on a {h}x{w} grid (colour and number = decode index, red ring = first)", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    # a 256-colour palette PNG: the same picture at a fraction of the RGB file's size (it lives in git)
    Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)
    return out


def parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid: expected HxW like 8x8, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid: sides must be >= 1, got {text!r}")
    return h, w


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--grid", type=parse_grid, default=(8, 8), help="HxW (default 8x8)")
    p.add_argument("--seed", type=int, default=0, help="fixed_random's seed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(render(args.grid, args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
