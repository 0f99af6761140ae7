"""The ordering registry: ``model.variant`` name -> the variant's LightningModule binding ("module:Class").

Adding an ordering is one file (an ``Ordering`` subclass plus ``class XModule(ARModule): ordering_class = X``)
and one line below. Everything else — the config validator, the CLIs, the demo, the bench, the ablation runner,
editing and the tests — reads this registry and the ``capabilities`` each ordering declares, never a list of its
own. Orderings that live outside roar register without editing it: ``ROAR_ORDERINGS="name=pkg.mod:XModule,..."``.
"""
from __future__ import annotations

import importlib
import os

VARIANTS = {
    "raster": "lightning_modules.raster:RasterModule",
    "rar": "lightning_modules.rar:RARModule",
    "randar": "lightning_modules.randar:RandARModule",
    "arpg": "lightning_modules.arpg:ARPGModule",
    "scan": "lightning_modules.scan:ScanModule",
    "sigma_gpt": "lightning_modules.sigma_gpt:SigmaGPTModule",
}
PLUGINS_ENV = "ROAR_ORDERINGS"


def registry() -> dict[str, str]:
    """VARIANTS plus the plug-ins named in $ROAR_ORDERINGS (read on every call: subprocesses inherit it)."""
    out = dict(VARIANTS)
    for item in filter(None, (p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(","))):
        name, sep, target = item.partition("=")
        if not sep or ":" not in target:
            raise ValueError(f"{PLUGINS_ENV}: {item!r} must look like name=package.module:ModuleClass")
        out[name.strip()] = target.strip()
    return out


def variant_names() -> list[str]:
    return list(registry())


def variant_class(name: str):
    """The LightningModule binding of ordering ``name``."""
    table = registry()
    if name not in table:
        raise ValueError(f"model.variant: unknown variant {name!r} (choose from {sorted(table)})")
    module, attr = table[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model.variant: {name!r} is registered as {table[name]}, which cannot be imported "
                         f"({type(err).__name__}: {err})") from None


def ordering_class(name: str):
    """The plain ordering class (lightning_modules/ordering.py) of variant ``name``."""
    return variant_class(name).ordering_class


def capabilities(name: str):
    return ordering_class(name).capabilities


def build_ordering(name: str, grid: tuple[int, int], **kwargs):
    """A plain ordering object, no Lightning module around it (kwargs: max_steps, model=ModelConfig)."""
    return ordering_class(name)(grid, **kwargs)


def build_module(model: dict, tokenizer: dict, **kwargs):
    """model['variant'] picks the class; every other argument is passed through (see ARModule)."""
    return variant_class(model["variant"])(model=model, tokenizer=tokenizer, **kwargs)
