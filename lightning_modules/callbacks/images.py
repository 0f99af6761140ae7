"""Small image utilities shared by the grid, order-map and demo code (uint8 in, uint8 out)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def upscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Integer nearest-neighbour upscaling of [..., H, W] (torchvision's resize would interpolate or need PIL)."""
    return images.repeat_interleave(scale, -2).repeat_interleave(scale, -1) if scale > 1 else images


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1, pad_value: int = 255) -> torch.Tensor:
    """images uint8 [B, 3, H, W] -> one grid uint8 [3, rows*(H*scale+pad)+pad, min(nrow, B)*(W*scale+pad)+pad]:
    torchvision's make_grid over the images upscaled for display (white frame by default)."""
    from torchvision.utils import make_grid

    images = upscale(images, scale)
    if images.shape[0] == 1:  # make_grid returns a lone image without its frame; keep the frame every grid has
        return torch.nn.functional.pad(images[0], (pad,) * 4, value=pad_value)
    return make_grid(images, nrow=nrow, padding=pad, pad_value=pad_value)


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
