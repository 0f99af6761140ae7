"""Pixel tokenizer: grey levels quantised to a small vocabulary (one code per pixel).

For the embedded 8x8 digits: an 8x8 image becomes an 8x8 grid of ``levels`` codes. Lossless when the images
hold exactly ``levels`` evenly spaced grey values (digits have 17: 0..16 scaled to 0..255).
"""
from __future__ import annotations

import torch

from tokenizers.base import ImageTokenizer


class PixelTokenizer(ImageTokenizer):
    name = "pixel"
    downsample = 1

    def __init__(self, levels: int = 17):
        super().__init__()
        if levels < 2 or levels > 256:
            raise ValueError(f"tokenizer.levels must be in [2, 256], got {levels}")
        self.levels = levels
        self.vocab_size = levels

    def config(self) -> dict:
        return {"levels": self.levels}

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # images uint8 [B,C,H,W] -> grey [B,H,W] -> codes in [0, levels)
        grey = images.float().mean(dim=1)
        return torch.round(grey / 255.0 * (self.levels - 1)).long().clamp_(0, self.levels - 1)

    @torch.no_grad()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [B,h,w] -> uint8 [B,3,h,w]
        grey = torch.round(codes.float().clamp(0, self.levels - 1) * (255.0 / (self.levels - 1)))
        return grey.to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


class CodesTokenizer(ImageTokenizer):
    """No pixels: the model trains on pre-extracted codes of an external tokenizer (or on official checkpoints
    without their VQ). ``decode`` shows codes as grey levels so grids and order maps still render."""

    name = "codes"

    def __init__(self, vocab_size: int, source: str = ""):
        super().__init__()
        self.vocab_size = vocab_size
        self.source = source  # the fingerprint of the real tokenizer the codes came from, when known

    def config(self) -> dict:
        return {"vocab_size": self.vocab_size, "source": self.source}

    def _encode(self, images):
        raise ValueError("tokenizer.kind=codes cannot encode images: use code shards or a real tokenizer")

    @torch.no_grad()
    def _decode(self, codes):
        grey = (codes.float() * (255.0 / max(1, self.vocab_size - 1))).round().to(torch.uint8)
        return grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
