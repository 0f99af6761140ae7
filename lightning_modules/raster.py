"""Raster: next-token prediction in raster order (the LlamaGen c2i baseline and control arm).

Training sequence over an order sigma (identity here; RAR reuses it with random orders), N slots:
    slot:   0        1          2         ...  N-1
    input:  class    x_s0       x_s1      ...  x_s(N-2)      (RoPE / abs pos of the token's own position)
    target: x_s0     x_s1       x_s2      ...  x_s(N-1)      (target-aware position = s_j for slot j)
Causal mask; logits at every slot. Decoding: one token per step through the KV cache (row = slot).
"""
from __future__ import annotations

import torch

from lightning_modules.base import ARModule
from lightning_modules.nn.sequence import SLOT_CLASS, SLOT_IMAGE, Seq
from lightning_modules.ordering import Capabilities, Ordering
from lightning_modules.sampling import DecodePlan, DecodeState
from lightning_modules.schedules import step_counts


def next_token_inputs(codes: torch.Tensor, labels: torch.Tensor, order: torch.Tensor) -> tuple[Seq, torch.Tensor]:
    """codes [B, N] raster, order [B, N] -> the teacher-forced sequence above and targets [B, N]."""
    B, N = codes.shape
    x = torch.gather(codes, 1, order)  # [B, N] tokens in decode order = targets
    zero = torch.zeros(B, 1, dtype=torch.long, device=codes.device)
    kind = torch.full((B, N), SLOT_IMAGE, dtype=torch.long, device=codes.device)
    kind[:, 0] = SLOT_CLASS
    seq = Seq(kind=kind, ids=torch.cat([zero, x[:, :-1]], 1), pos=torch.cat([zero - 1, order[:, :-1]], 1),
              labels=labels, rows=torch.arange(N, device=codes.device), target=order)
    return seq, x


def next_token_step(state: DecodeState) -> Seq:
    """Feed the tokens decoded since the last step (after the class slot on step 0); predict at the last slot."""
    order, dev = state.order, state.order.device
    B2 = order.shape[0]
    idx = torch.arange(state.fed, state.done, device=dev)  # order indices to feed
    x = state.tokens[:, idx]
    pos = order[:, idx]
    nxt = order[:, (idx + 1).clamp(max=state.num_positions - 1)]  # target-aware: position predicted next
    rows = idx + 1
    kind = torch.full((B2, len(idx)), SLOT_IMAGE, dtype=torch.long, device=dev)
    if state.first:
        one = torch.zeros(B2, 1, dtype=torch.long, device=dev)
        kind = torch.cat([one + SLOT_CLASS, kind], 1)
        x, pos = torch.cat([one, x], 1), torch.cat([one - 1, pos], 1)
        nxt = torch.cat([order[:, :1], nxt], 1)
        rows = torch.cat([rows.new_zeros(1), rows])
    out = torch.tensor([kind.shape[1] - 1], device=dev)
    return Seq(kind=kind, ids=x, pos=pos, labels=state.labels, rows=rows, target=nxt, out=out)


class RasterOrdering(Ordering):
    """One fixed order for every sample, one token per step. ``scan_order`` is the order (raster here)."""

    capabilities = Capabilities(flavours=("llama", "rar_vit"))
    default_sample = dict(schedule="one_per_step", cfg_schedule="constant")

    def scan_order(self, device=None) -> torch.Tensor:
        """long [N]: the raster index decoded i-th."""
        return torch.arange(self.num_positions, device=device)

    def train_order(self, batch: int, step: int, generator, device=None) -> torch.Tensor:
        return self.scan_order(device).expand(batch, -1)

    def train_inputs(self, codes, labels, step, generator, order=None):
        if order is None:
            order = self.train_order(codes.shape[0], step, generator, codes.device)
        return next_token_inputs(codes, labels, order)

    def decode_plan(self, batch, num_steps, schedule, generator, known=None, order=None, device=None) -> DecodePlan:
        # The fixed order always; known positions are kept by the sampling loop when their turn comes.
        if order is None:
            order = self.scan_order(device).expand(batch, -1)
        return DecodePlan(order=order, counts=step_counts(schedule, self.num_positions, num_steps))

    def decode_step(self, state, n):
        if n != 1:
            raise ValueError("sample.schedule: next-token orderings decode exactly one token per step")
        return next_token_step(state)


class RasterModule(ARModule):
    ordering_class = RasterOrdering
