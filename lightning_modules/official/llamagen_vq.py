"""Import the released LlamaGen VQ tokenizers (vq_ds16_c2i.pt, vq_ds8_c2i.pt) from a LOCAL file.

Official ``.pt`` checkpoints pickle an argparse Namespace next to the weights, so they are refused by
``load_state_dict_file`` with a one-line conversion hint; convert once (trusted environment) to safetensors.
"""
from __future__ import annotations

import torch

from lightning_modules.official.checkpoint_io import load_state_dict_file, resolve_config, strict_load
from tokenizers.vq import LlamaGenVQ, preset_config

DEFAULT_PRESET = "vq16"  # vq_ds16_c2i, the tokenizer of the LlamaGen / RandAR / ARPG generator releases


def official_keys(preset: str = DEFAULT_PRESET, **overrides) -> dict[str, list[int]]:
    """State-dict key -> shape of the preset, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = LlamaGenVQ.from_preset(preset, **overrides)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def load_llamagen_vq(path: str, preset: str | None = None, prefer_ema: bool = False, **overrides) -> LlamaGenVQ:
    """A frozen LlamaGen VQ from local weights. Config: the one embedded by roar's ``save_tokenizer`` when the
    file has it, else ``preset`` (default "vq16") with ``overrides``. Loading is strict (all problems listed)."""
    state_dict = load_state_dict_file(path, prefer_ema=prefer_ema)
    cfg = resolve_config(path, ("llamagen_vq", "digits_vq"), preset, overrides, preset_config, DEFAULT_PRESET)
    model = LlamaGenVQ(**cfg)
    strict_load(model, state_dict, f"llamagen_vq weights {path}")
    return model.eval()


def load_official(path: str, preset: str | None, prefer_ema: bool, overrides: dict) -> LlamaGenVQ:
    """experiments.import_official's entry: ``overrides`` are the constructor arguments of a --config file."""
    return load_llamagen_vq(path, preset=preset, prefer_ema=prefer_ema, **overrides)
