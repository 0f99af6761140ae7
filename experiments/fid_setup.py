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
    elif e.extractor == "shards":  # trained on the run's own shards (experiments.train_extractor --shards)
        path = e.extractor_weights
        ref = e.reference or (cfg.data.val_shards if cfg.data.kind == "images" else "")
        if not ref:
            raise ValueError("eval.reference: give the val image shards (a pattern) or a reference .npz: code shards "
                             "hold no images to compare with")
    else:
        path = e.inception_weights
        ref = e.reference or cfg.data.val_shards
        if not ref:
            raise ValueError("eval.reference: give an ADM reference .npz or data.val_shards to compute one")
    if e.extractor != "inception":  # the domain check now, as a config error, not at the first FID of a run
        from experiments.config import ConfigError
        from lightning_modules.metrics.extractors import load_extractor
        from lightning_modules.metrics.shard_extractor import check_domain

        try:
            check_domain(load_extractor(e.extractor, path), cfg.data.image_size, ref)
        except (ValueError, FileNotFoundError) as err:
            key, _, message = str(err).partition(": ")
            raise ConfigError(key if key.startswith("eval.") else "eval.extractor_weights",
                              message if key.startswith("eval.") else str(err)) from None
    return FIDCallback(every_n_steps=e.fid_every_steps, num_samples=e.fid_num_samples,
                       num_classes=cfg.model.num_classes, extractor_kind=e.extractor, extractor_path=path, ref=ref,
                       seed=cfg.callbacks.sample_seed, batch_size=min(BATCH, e.fid_num_samples),
                       ref_kwargs={"image_size": cfg.data.image_size, "cache_dir": os.path.join(".cache", "fid_refs")})
