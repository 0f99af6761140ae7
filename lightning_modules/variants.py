"""Ordering registry: ``model.variant`` name -> LightningModule class. A new ordering is one file + one line."""
from __future__ import annotations

import importlib

VARIANTS = {
    "raster": "lightning_modules.raster:RasterModule",
    "rar": "lightning_modules.rar:RARModule",
    "randar": "lightning_modules.randar:RandARModule",
    "arpg": "lightning_modules.arpg:ARPGModule",
}


def variant_class(name: str):
    if name not in VARIANTS:
        raise ValueError(f"model.variant: unknown variant {name!r} (choose from {sorted(VARIANTS)})")
    module, attr = VARIANTS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_module(model: dict, tokenizer: dict, **kwargs):
    """model['variant'] picks the class; every other argument is passed through (see ARModule)."""
    return variant_class(model["variant"])(model=model, tokenizer=tokenizer, **kwargs)
