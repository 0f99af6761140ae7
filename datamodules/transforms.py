"""Image transforms for the shard DataModules (PIL in, PIL or uint8 numpy out).

``adm_center_crop`` is the ImageNet preprocessing of guided-diffusion (ADM), which LlamaGen, RAR, RandAR and
ARPG all train on, so FID numbers stay comparable: halve with a BOX filter while the short side is at least
twice the target (cheap, alias-free downscaling of large photos), one BICUBIC resize so the short side equals
the target, then a centre crop.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image


def adm_center_crop(pil: Image.Image, size: int) -> Image.Image:
    """ADM centre crop of ``pil`` to ``size`` x ``size``."""
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.width // 2, pil.height // 2), resample=Image.BOX)
    scale = size / min(pil.size)
    # Python's round (half to even) on purpose: it is what the reference does, so crops match it pixel for pixel
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), resample=Image.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    return pil.crop((left, top, left + size, top + size))


def resize_square(pil: Image.Image, size: int) -> Image.Image:
    """center_crop="none": keep images that already have the size, else a plain BICUBIC resize (may stretch)."""
    if pil.size == (size, size):
        return pil
    return pil.resize((size, size), resample=Image.BICUBIC)


def to_8bit(pil: Image.Image) -> Image.Image:
    """An 8-bit L or RGB copy. 16-bit grey (PNG / TIFF: modes I;16*, and I as older Pillows read them) is rescaled
    to 0..255: PIL's own convert("L") clips it, which turns most of a 16-bit photo white."""
    if pil.mode.startswith("I;16") or pil.mode == "I":
        wide = np.asarray(pil).astype(np.float64).clip(0, 65535)
        return Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
    if pil.mode == "F":  # 32-bit float: no agreed value range (0..1? 0..255? HDR?) to map from
        raise ValueError("a 32-bit float image (PIL mode F) has no defined value range; save it as 8 or 16 bit")
    return pil.convert("L" if pil.mode in ("L", "1") else "RGB")


def to_rgb(pil: Image.Image) -> Image.Image:
    """A decoded RGB copy: grey, palette, RGBA and CMYK (a few ImageNet JPEGs are CMYK) become 3 channels; 16-bit
    grey is rescaled first (``to_8bit``)."""
    if pil.mode.startswith("I") or pil.mode == "F":
        pil = to_8bit(pil)
    return pil.convert("RGB")  # convert() always loads and copies, even from RGB


def maybe_hflip(arr: np.ndarray, rng: random.Random, p: float = 0.5) -> np.ndarray:
    """Horizontal flip of an [H, W, C] array with probability p, drawn from the given seeded generator."""
    return arr[:, ::-1] if rng.random() < p else arr
