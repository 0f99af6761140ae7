"""Config -> FIDCallback. For the embedded digits the extractor is the project's small CNN, trained once with a
fixed seed (``python -m experiments.train_extractor``) and cached, so its features — and FIDs — are reproducible."""
from __future__ import annotations

import os

from omegaconf import DictConfig

from lightning_modules.metrics.extractors import DEFAULT_DIGITS_WEIGHTS as DEFAULT_DIGITS_EXTRACTOR
from lightning_modules.sample_set import BATCH  # the one sample-set protocol (experiments.sample uses it too)


def ensure_digits_extractor(path: str = DEFAULT_DIGITS_EXTRACTOR) -> str:
    """Train the digits extractor (deterministic, seconds) when the file is not there yet."""
    if not os.path.isfile(path):
        from lightning_modules.metrics.extractors import save_digits_extractor, train_digits_extractor

        model, info = train_digits_extractor(seed=0)
        save_digits_extractor(model, path, info)
    return path


def fid_callback(cfg: DictConfig, run_dir: str):
    from lightning_modules.callbacks.fid import FIDCallback

    e = cfg.eval
    if e.extractor == "digits":
        path = e.extractor_weights or ensure_digits_extractor()
        ref = e.reference or "digits:val"
    else:
        path = e.inception_weights
        ref = e.reference or cfg.data.val_shards
        if not ref:
            raise ValueError("eval.reference: give an ADM reference .npz or data.val_shards to compute one")
    return FIDCallback(every_n_steps=e.fid_every_steps, num_samples=e.fid_num_samples,
                       num_classes=cfg.model.num_classes, extractor_kind=e.extractor, extractor_path=path, ref=ref,
                       seed=cfg.callbacks.sample_seed, batch_size=min(BATCH, e.fid_num_samples),
                       ref_kwargs={"image_size": cfg.data.image_size, "cache_dir": os.path.join(".cache", "fid_refs")})
