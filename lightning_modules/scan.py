"""Scan: next-token prediction in one fixed scan order (``model.scan``), the same for every sample.

The raster layout (lightning_modules/raster.py) over another permutation of the grid: column, snake, diagonal,
spiral in/out, z-curve, Hilbert, subsample, alternate or one fixed random permutation (lightning_modules/scans.py,
docs/scans.md). It answers "which scan order is best for a plain AR model?" on one backbone. ``model.scan=raster``
is exactly the raster ordering. The checkpoint records the scan (model.scan, model.scan_seed); training,
validation NLL and sampling all use it. RAR's annealing ends in the same scan (lightning_modules/rar.py).
"""
from __future__ import annotations

import torch

from lightning_modules.base import ARModule
from lightning_modules.raster import RasterOrdering
from lightning_modules.scans import scan_order


class ScanOrdering(RasterOrdering):
    reads = ("scan", "scan_seed")

    def scan_order(self, device=None) -> torch.Tensor:
        return scan_order(self.model.scan, self.grid, self.model.scan_seed).to(device)


class ScanModule(ARModule):
    ordering_class = ScanOrdering
