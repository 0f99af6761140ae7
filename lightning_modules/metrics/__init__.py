"""Evaluation: feature extractors, FID / IS / precision-recall numerics and reference statistics.

One numerics path (``scores``) serves ``experiments.evaluate``, the reference cache and ``callbacks.fid``.
"""
from lightning_modules.metrics.extractors import (
    DigitsCNN,
    FeatureExtractor,
    InceptionExtractor,
    check_inception_weights,
    load_extractor,
    train_digits_extractor,
)
from lightning_modules.metrics.reference import (
    NpzImages,
    RefStats,
    extract_stats,
    load_reference_npz,
    resolve_reference,
    save_reference_npz,
)
from lightning_modules.metrics.scores import (
    FeatureStats,
    fid_from_stats,
    gaussian_stats,
    inception_score,
    precision_recall,
)

__all__ = [
    "DigitsCNN", "FeatureExtractor", "InceptionExtractor", "check_inception_weights", "load_extractor",
    "train_digits_extractor", "NpzImages", "RefStats", "extract_stats", "load_reference_npz", "resolve_reference",
    "save_reference_npz", "FeatureStats", "fid_from_stats", "gaussian_stats", "inception_score", "precision_recall",
]
