"""The tokenizer protocol every AR model in roar trains on.

Contract (docs/architecture.md):
  encode(images uint8 [B,3,H,W]) -> codes long [B,h,w]
  decode(codes long [B,h,w])     -> images uint8 [B,3,H,W]
  vocab_size, grid(H, W) -> (h, w), name, fingerprint (hash of config + weights)
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

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
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
