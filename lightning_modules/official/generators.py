"""Build roar generator modules from official GPT configs + state dicts (strict, both directions of names)."""
from __future__ import annotations

import torch

from lightning_modules.official import GENERATORS, module_of
from lightning_modules.variants import build_module


def family_module(family: str):
    if family not in GENERATORS:
        raise ValueError(f"--family: unknown generator family {family!r} (choose from {GENERATORS})")
    return module_of(family)


def vocab_of(family: str, cfg: dict) -> int:
    return family_module(family).vocab_size(cfg)


def build_generator(family: str, cfg: dict, tokenizer: dict | None = None, device="cpu"):
    """A roar module with the official architecture (random init); ``tokenizer`` defaults to codes-only."""
    fam = family_module(family)
    tokenizer = tokenizer or {"build": {"kind": "codes", "vocab_size": vocab_of(family, cfg)}}
    with torch.device(device):
        module = build_module(fam.model_config(cfg), tokenizer, sample=dict(fam.SAMPLE_DEFAULTS))
    return module


def load_official_weights(module, family: str, state_dict: dict) -> None:
    """Map official names to ours and load strictly: every missing/unexpected key and shape mismatch is listed."""
    from lightning_modules.official.checkpoint_io import strict_load

    strict_load(module.backbone, family_module(family).to_ours(state_dict), f"{family} checkpoint")


def official_state_dict(module, family: str) -> dict:
    """Our backbone's weights under the official names (for key-set checks and export)."""
    return family_module(family).to_official(module.backbone.state_dict())
