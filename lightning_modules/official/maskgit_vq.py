"""Import the released MaskGIT VQGAN (``maskgit-vqgan-imagenet-f16-256.bin``, a plain state dict) from a LOCAL file."""
from __future__ import annotations

import torch

from lightning_modules.official.checkpoint_io import load_state_dict_file, resolve_config, strict_load
from tokenizers.maskgit_vq import MaskGITVQ, config_from_official, preset_config

DEFAULT_PRESET = "maskgit_1024"  # the released f16 VQGAN, the tokenizer of the RAR generator releases


def official_keys(preset: str = DEFAULT_PRESET, **overrides) -> dict[str, list[int]]:
    """State-dict key -> shape of the preset, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = MaskGITVQ.from_preset(preset, **overrides)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def load_maskgit_vq(path: str, preset: str | None = None, **overrides) -> MaskGITVQ:
    """A frozen MaskGIT VQGAN from local weights (config embedded by roar, else ``preset``, default the release)."""
    state_dict = load_state_dict_file(path)
    cfg = resolve_config(path, ("maskgit_vq",), preset, overrides, preset_config, DEFAULT_PRESET)
    model = MaskGITVQ(**cfg)
    strict_load(model, state_dict, f"maskgit_vq weights {path}")
    return model.eval()


def load_official(path: str, preset: str | None, prefer_ema: bool, overrides: dict) -> MaskGITVQ:
    """experiments.import_official's entry: ``overrides`` are a --config file, flat or in the official nested layout."""
    if prefer_ema:
        raise ValueError("--ema: the MaskGIT VQGAN release is a plain state dict without EMA weights")
    if "vqgan_config" in overrides:  # the official nested layout
        overrides = config_from_official(overrides)
    return load_maskgit_vq(path, preset=preset, **overrides)
