"""2D rotary position embedding, looked up from explicit raster position ids.

LlamaGen's ``precompute_freqs_cis_2d`` (shared by RandAR and ARPG): half of a head's dims rotate with the row,
half with the column; per-axis frequencies f_k = base^(-2k/half), k < half/2 (half = head_dim/2); rotation acts
on ADJACENT pairs (2j, 2j+1) (interleaved layout, not rotate-half). Position -1 (the class slot) maps to an
all-zero row (cos = sin = 0), which turns the class token's q and k into zero vectors — the official quirk that
checkpoint parity needs (docs/methods/randar_arpg.md §0).
"""
from __future__ import annotations

import torch
from torch import nn


def rope_2d_angles(grid_h: int, grid_w: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles float32 [grid_h*grid_w, head_dim/2] in raster order: [row*f, col*f]."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [hd/4]
    rows = torch.arange(grid_h, dtype=torch.float32)
    cols = torch.arange(grid_w, dtype=torch.float32)
    ang_r = torch.outer(rows, freqs)  # [H, hd/4]
    ang_c = torch.outer(cols, freqs)  # [W, hd/4]
    ang = torch.cat([ang_r[:, None, :].expand(-1, grid_w, -1), ang_c[None, :, :].expand(grid_h, -1, -1)], dim=-1)
    return ang.reshape(grid_h * grid_w, half)


CLASS_ROWS = ("zero", "identity")


class Rope2D(nn.Module):
    """Holds the (cos, sin) table with a leading row for position -1 (the class slot); non-persistent like the
    official. ``class_row="zero"`` is the official all-zero row: the class key is the zero vector, so every query
    gives it the score 0 and no weight can learn to attend to it more (its value still flows, with the weight the
    other keys leave it). ``"identity"`` (cos = 1, sin = 0) leaves the class q / k unrotated, so that score is
    learnable. Official checkpoints need "zero"; "identity" is an option for training from scratch."""

    def __init__(self, grid_h: int, grid_w: int, head_dim: int, base: float = 10000.0, class_row: str = "zero"):
        super().__init__()
        if class_row not in CLASS_ROWS:
            raise ValueError(f"model.llama.class_rope: {class_row!r} is not one of {list(CLASS_ROWS)}")
        self.grid, self.class_row = (grid_h, grid_w), class_row
        self.set_angles(rope_2d_angles(grid_h, grid_w, head_dim, base))

    def set_angles(self, angles: torch.Tensor) -> None:
        """Install a table of angles [P, head_dim/2] (resolution extrapolation swaps in a mixed table)."""
        first = torch.zeros(1, angles.shape[1], 2)
        if self.class_row == "identity":
            first[..., 0] = 1.0
        table = torch.cat([first, torch.stack([angles.cos(), angles.sin()], dim=-1)], dim=0)  # [1+P, hd/2, 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """pos long [B, L] (-1 = class) -> float32 [B, L, head_dim/2, 2]."""
        return self.table[pos + 1]


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, hd], rope [B, L, hd/2, 2] -> rotated x (computed in fp32, cast back, like the official)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, L, H, hd/2, 2]
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)
