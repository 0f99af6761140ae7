"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes).

Pixel values 0..16 are scaled to uint8 0..255 exactly (v * 255 / 16 rounded), so the 17-level pixel tokenizer
is lossless on them. The train/val split is a fixed seeded permutation: 1,438 train / 359 val (80/20).
"""
from __future__ import annotations

import numpy as np

VAL_FRACTION = 0.2
SPLITS = ("train", "val")


def digits_arrays(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [n, 8, 8], labels int64 [n]) for ``split`` in {"train", "val"}."""
    if split not in SPLITS:
        raise ValueError(f"data.split: unknown split {split!r} (choose from {SPLITS})")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    labels = digits.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(len(labels) * VAL_FRACTION))
    idx = perm[n_val:] if split == "train" else perm[:n_val]
    return images[idx], labels[idx]
