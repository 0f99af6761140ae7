"""RARModule: Randomized AutoRegressive modelling (Yu et al. 2024, arXiv 2411.00776; docs/methods/rar.md).

Training: per sample, a coin with probability r(step) picks a random permutation, else raster order
(rar.md §1). r is 1 until ``anneal_start``, falls linearly to 0 at ``anneal_end`` (fractions of
training; paper 200→300 of 400 epochs = 0.5→0.75) — a pure function of the global step. Every slot also
carries the position it must predict next (target-aware position embedding). The sequence is the raster one
(``next_token_inputs``) over the drawn order. Sampling is raster with a KV cache and RAR's pow-cosine CFG.
At r = 0 the objective is exactly the raster objective.
"""
from __future__ import annotations

import torch

from lightning_modules.raster import RasterModule
from lightning_modules.schedules import rar_random_ratio


class RARModule(RasterModule):
    default_sample = dict(schedule="one_per_step", cfg_schedule="pow_cosine", cfg_power=1.0)

    def backbone_options(self, dims):
        return {"target_aware": True}

    def random_ratio(self, step: int) -> float:
        m = self.hparams.model
        total = self.hparams.max_steps
        start, end = m.get("rar_anneal_start", 0.5), m.get("rar_anneal_end", 0.75)
        return rar_random_ratio(step, int(round(start * total)), int(round(end * total)))

    def train_order(self, batch, step, generator):
        n, dev = self.num_positions, self.device
        perms = torch.rand(batch, n, generator=generator, device=dev).argsort(-1)  # [B, N]
        coin = torch.rand(batch, generator=generator, device=dev) < self.random_ratio(step)  # per sample
        raster = torch.arange(n, device=dev).expand(batch, -1)
        return torch.where(coin[:, None], perms, raster)

    def training_step(self, batch, batch_idx):
        self.log("train/rar_ratio", self.random_ratio(self.global_step))
        return super().training_step(batch, batch_idx)
