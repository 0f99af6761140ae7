"""RAR: Randomized AutoRegressive modelling (Yu et al. 2024, arXiv 2411.00776; docs/methods/rar.md).

Training: per sample, a coin with probability r(step) picks a random permutation, else raster order
(rar.md §1). r is 1 until ``anneal_start``, falls linearly to 0 at ``anneal_end`` (fractions of
training; paper 200→300 of 400 epochs = 0.5→0.75) — a pure function of the global step. Every slot also
carries the position it must predict next (target-aware position embedding). The sequence is the raster one
(``next_token_inputs``) over the drawn order. Sampling is raster with a KV cache and RAR's pow-cosine CFG.
At r = 0 the objective is exactly the raster objective. ``model.scan`` makes the annealing end in any other scan
(lightning_modules/scans.py: RAR Table 3's spiral in/out, z-curve, subsample, alternate, and the rest of the zoo);
then sampling, validation and r = 0 use that scan.
"""
from __future__ import annotations

import torch

from lightning_modules.base import ARModule
from lightning_modules.scan import ScanOrdering
from lightning_modules.schedules import rar_random_ratio


class RAROrdering(ScanOrdering):
    """Anneals from random orders to ``model.scan`` (raster by default; RAR Table 3 ablates the target scan)."""

    default_sample = dict(schedule="one_per_step", cfg_schedule="pow_cosine", cfg_power=1.0)
    reads = ("rar_anneal_start", "rar_anneal_end", *ScanOrdering.reads)

    def backbone_options(self, dims):
        return {"target_aware": True}

    def random_ratio(self, step: int) -> float:
        m, total = self.model, self.max_steps
        start, end = m.rar_anneal_start, m.rar_anneal_end
        return rar_random_ratio(step, int(round(start * total)), int(round(end * total)))

    def train_order(self, batch, step, generator, device=None):
        n = self.num_positions
        perms = torch.rand(batch, n, generator=generator, device=device).argsort(-1)  # [B, N]
        coin = torch.rand(batch, generator=generator, device=device) < self.random_ratio(step)  # per sample
        target = self.scan_order(device).expand(batch, -1)
        return torch.where(coin[:, None], perms, target)

    def train_logs(self, step):
        return {"train/rar_ratio": self.random_ratio(step)}


class RARModule(ARModule):
    ordering_class = RAROrdering
