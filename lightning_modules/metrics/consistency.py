"""Class-consistency of class-conditional samples: the share that a classifier assigns to their conditioning class.

A standard check of conditional samplers (the "classification accuracy score" family of metrics): FID can be good
for samples that ignore their label, this cannot. With the project's digits CNN (lightning_modules/metrics/
extractors.py, 99.4% accurate on real val digits) a sampler that draws the class it is asked for scores near 1,
one that ignores the class scores chance (1 / number of classes).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def predicted_classes(extractor, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> long [N]: the extractor's argmax class per image."""
    if not getattr(extractor, "num_classes", 0):
        raise ValueError(f"class-consistency: the {getattr(extractor, 'name', 'extractor')} extractor has no "
                         f"classifier head (use the digits extractor, or one trained on your labelled shards)")
    out = [extractor.features_and_logits(images[i:i + batch_size])[1].argmax(-1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def class_consistency(extractor, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Share of ``images`` (uint8 [N, 3, H, W]) classified as their ``labels`` (long [N]): 1 = every sample is of
    its class, 1 / C = the label is ignored."""
    if len(images) != len(labels):
        raise ValueError(f"class-consistency: {len(images)} images for {len(labels)} labels")
    return float((predicted_classes(extractor, images, batch_size) == labels.cpu()).float().mean())
