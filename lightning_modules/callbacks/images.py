"""Small image utilities shared by the grid, order-map and demo code (uint8 in, uint8 out)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1) -> torch.Tensor:
    """images uint8 [B, 3, H, W] -> one grid uint8 [3, rows*(H*scale+pad)+pad, nrow*(W*scale+pad)+pad]."""
    if scale > 1:
        images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    B, C, H, W = images.shape
    rows = (B + nrow - 1) // nrow
    grid = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = images[i]
    return grid


def save_png(image: torch.Tensor, path: str) -> str:
    """uint8 [3, H, W] -> PNG file (folders created; written atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp)
    os.replace(tmp, path)
    return path


def upscale_for_display(images: torch.Tensor, min_side: int = 64) -> int:
    """Integer nearest-neighbour scale that makes tiny images (8x8 digits) visible in TensorBoard."""
    return max(1, min_side // max(1, images.shape[-1]))


def to_numpy_nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
