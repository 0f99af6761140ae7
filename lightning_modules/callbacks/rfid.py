"""Reconstruction FID of a tokenizer: FID between a fixed image set and its encode -> quantise -> decode copies.

rFID is how the tokenizer papers (LlamaGen, MaskGIT) report a VQ: it bounds the FID any generator trained on
its codes can reach. The callback logs ``val/rfid`` after every validation epoch of a module that has
``reconstruct(uint8 [B, 3, H, W]) -> uint8 [B, 3, H, W]`` (lightning_modules.tokenizer.VQTokenizerModule).
"""
from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _stats(extractor, images: torch.Tensor, batch_size: int) -> dict:
    from lightning_modules.metrics.reference import extract_stats

    return extract_stats(extractor, (images[i:i + batch_size] for i in range(0, len(images), batch_size)),
                         total=len(images))[0]


@torch.no_grad()
def reconstruct_all(reconstruct, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, H, W] on the CPU, ``batch_size`` images at a time on ``device``."""
    return torch.cat([reconstruct(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def reconstruction_fid(extractor, originals: torch.Tensor, reconstructions: torch.Tensor,
                       batch_size: int = 256, reference: dict | None = None) -> float:
    """FID(reconstructions, originals); ``reference`` = precomputed stats of the originals (from ``_stats``)."""
    from lightning_modules.metrics.scores import fid_from_stats

    if len(originals) != len(reconstructions):
        raise ValueError(f"rFID: {len(originals)} originals vs {len(reconstructions)} reconstructions")
    ref = reference or _stats(extractor, originals, batch_size)
    rec = _stats(extractor, reconstructions, batch_size)
    return float(fid_from_stats(rec["mu"], rec["sigma"], ref["mu"], ref["sigma"]))


class ReconstructionFID(Callback):
    """Logs ``val/rfid`` over ``images`` (uint8 [N, 3, H, W], e.g. the whole val split) every validation epoch.

    The originals' statistics are computed once; only the reconstructions are re-extracted each time."""

    def __init__(self, extractor, images: torch.Tensor, batch_size: int = 256):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"ReconstructionFID: images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.extractor, self.images, self.batch_size = extractor, images, batch_size
        self._reference: dict | None = None
        self.last: float | None = None

    def score(self, reconstructions: torch.Tensor) -> float:
        """rFID of ``reconstructions`` (uint8, in the order of ``images``) against the cached originals' statistics."""
        if self._reference is None:
            self._reference = _stats(self.extractor, self.images, self.batch_size)
        return reconstruction_fid(self.extractor, self.images, reconstructions, self.batch_size, self._reference)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last = self.score(reconstruct_all(pl_module.reconstruct, self.images, pl_module.device, self.batch_size))
        pl_module.log("val/rfid", self.last)
