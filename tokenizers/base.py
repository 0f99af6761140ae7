"""The tokenizer protocol every AR model in roar trains on.

Contract (docs/architecture.md):
  encode(images uint8 [B,3,H,W]) -> codes long [B,h,w]
  decode(codes long [B,h,w])     -> images uint8 [B,3,H,W]
  vocab_size, grid(H, W) -> (h, w), name, fingerprint (hash of config + weights)
Subclasses implement _encode / _decode; the public pair runs them in IEEE fp32 on CUDA (no TF32).
Tokenizers are frozen inside generators; checkpoints and code shards record the fingerprint and a
mismatch is refused with both fingerprints named.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


class TokenizerMismatchError(ValueError):
    """A checkpoint / shard was made with another tokenizer or vocabulary."""


class ImageTokenizer(nn.Module):
    """Base class: subclasses set ``name``, ``vocab_size``, ``downsample`` and implement the two codecs."""

    name: str = "base"
    vocab_size: int = 0
    downsample: int = 1

    def config(self) -> dict:
        """Plain-data constructor arguments (recorded in checkpoints and manifests)."""
        raise NotImplementedError

    def grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"{self.name}: image size {height}x{width} not divisible by {self.downsample}")
        return height // self.downsample, width // self.downsample

    # The public codecs run in IEEE fp32 on CUDA whatever trainer.tf32 / sample.tf32 say (lightning_modules/tf32.py):
    # the codes of an image must not depend on the path that made them (pretokenize, or data.kind=images inside a
    # training run's TF32 scope: a quantizer's argmin flips on TF32 rounding), nor the pixels of a sample on whether
    # a callback or experiments.sample decoded it. Subclasses implement _encode / _decode.
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        from lightning_modules.tf32 import cuda_tf32  # here: tokenizers/ is imported before lightning_modules/

        with cuda_tf32(False):
            return self._encode(images)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        from lightning_modules.tf32 import cuda_tf32

        with cuda_tf32(False):
            return self._decode(codes)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """sha256 over name + config + every tensor of the state dict (16 hex chars)."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(json.dumps(self.config(), sort_keys=True, default=str).encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def check_fingerprint(expected: str, found: str, where: str) -> None:
    """Refuse data or weights made by another tokenizer, naming both fingerprints."""
    if expected != found:
        raise TokenizerMismatchError(
            f"{where}: tokenizer fingerprint {found} does not match the configured tokenizer {expected}"
        )


def check_images(images: torch.Tensor, who: str, downsample: int) -> None:
    """One-line errors for anything but uint8 [B, 3, H, W] with H, W divisible by the downsampling."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"{who}.encode: expected uint8 images [B,3,H,W], got {getattr(images, 'dtype', type(images))}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}.encode: expected images [B,3,H,W], got shape {list(images.shape)}")
    if images.shape[2] % downsample or images.shape[3] % downsample:
        raise ValueError(f"{who}.encode: image size {images.shape[2]}x{images.shape[3]} not divisible by {downsample}")


def check_codes(codes: torch.Tensor, who: str, vocab_size: int) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype.is_floating_point:
        raise ValueError(f"{who}.decode: expected integer codes [B,h,w], got "
                         f"{getattr(codes, 'dtype', type(codes))} {list(getattr(codes, 'shape', []))}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab_size):
        raise ValueError(f"{who}.decode: codes outside [0, {vocab_size}): min {int(codes.min())}, "
                         f"max {int(codes.max())}")
