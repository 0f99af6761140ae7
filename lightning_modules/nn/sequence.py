"""The sequence description: the one seam between an ordering strategy and a backbone.

An ordering (raster, RAR, RandAR, ARPG, ...) says *what* goes in which slot; the backbone only knows how to
embed slot kinds, encode positions and attend. ``Seq`` describes one forward: a whole training sequence, or
the new slots of one cached decode step.

Shapes: B batch, L slots in this forward, Q query-stream slots (ARPG), M output positions, Lk cache keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SLOT_CLASS = 0  # the class (condition) token; its label comes from ``Seq.labels``
SLOT_IMAGE = 1  # an image code, id in ``Seq.ids``
SLOT_POSITION = 2  # a position-instruction token (RandAR): a shared vector rotated to ``pos``


@dataclass
class Seq:
    kind: torch.Tensor  # long [B, L]: SLOT_* per slot
    ids: torch.Tensor  # long [B, L]: image code at image slots (ignored elsewhere)
    pos: torch.Tensor  # long [B, L]: raster position carried by the slot; -1 = none (class: zero RoPE row)
    labels: torch.Tensor  # long [B]: class label, num_classes = null (CFG) class
    rows: torch.Tensor  # long [L]: absolute slot index = KV-cache row (and AdaLN timestep row)
    target: torch.Tensor | None = None  # long [B, L]: position predicted next (target-aware PE); -1 none
    mask: torch.Tensor | None = None  # bool [B|1, 1, L, Lk]; None = causal over ``rows``
    query_pos: torch.Tensor | None = None  # long [B, Q]: target positions of the query stream (ARPG)
    query_mask: torch.Tensor | None = None  # bool [B|1, 1, Q, Lk]; None = every written key visible
    out: torch.Tensor | None = None  # long [M] or [B, M]: slots (of L, or of Q with a query stream) to predict at

    @property
    def batch_size(self) -> int:
        return self.kind.shape[0]


def causal_row_mask(rows: torch.Tensor, num_keys: int) -> torch.Tensor:
    """bool [1, 1, L, Lk]: slot at cache row r sees keys 0..r (the official boolean tril mask, row-indexed)."""
    keys = torch.arange(num_keys, device=rows.device)
    return (keys[None, :] <= rows[:, None])[None, None]


def gather_slots(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x [B, L, D], out [M] or [B, M] -> [B, M, D] (all slots when out is None)."""
    if out is None:
        return x
    if out.dim() == 1:
        return x[:, out]
    return torch.gather(x, 1, out[..., None].expand(-1, -1, x.shape[-1]))
