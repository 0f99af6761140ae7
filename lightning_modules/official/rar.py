"""RAR (bytedance/1d-tokenizer @ 942a96f, `modeling/rar.py`) -> roar `rar` on the `rar_vit` flavour.

Our rar_vit backbone keeps the official parameter names, so the mapping is the identity. The official
config is nested (model.generator.*, model.vq_model.codebook_size). Official sampling defaults (RAR-B release):
raster order, pow-cosine CFG g=16.0 p=2.75, temperature 1.0, no top-k / top-p (rar.md §5).
"""
from __future__ import annotations

import math
import re

from lightning_modules.official import CODE_STRIDE

FAMILY = "rar"
VARIANT = "rar"
SAMPLE_DEFAULTS = dict(schedule="one_per_step", cfg_schedule="pow_cosine", cfg_scale=16.0, cfg_power=2.75,
                       temperature=1.0, top_k=0, top_p=1.0, mode="official")
NAME_PREFIXES = ("rar",)
DEFAULT_TOKENIZER = "maskgit_vq"
# Released at 256 px: arch = (depth, width, MLP width); sample = the per-size guidance scale, power and
# temperature of the paper's Tab. 6.
RELEASES = {s: dict(arch=arch, image_size=256, sample=dict(cfg_scale=g, cfg_power=p, temperature=t))
            for s, arch, (g, p, t) in (("B", (24, 768, 3072), (16.0, 2.75, 1.0)),
                                       ("L", (24, 1024, 4096), (15.5, 2.5, 1.02)),
                                       ("XL", (32, 1280, 5120), (6.9, 1.5, 1.02)),
                                       ("XXL", (40, 1408, 6144), (8.0, 1.2, 1.02)))}


def official_config(size: str, image_size: int | None = None) -> dict:
    """The official nested config of a released size (vocab 1024: the MaskGIT VQGAN's codebook)."""
    rel = RELEASES[size]
    side = (image_size or rel["image_size"]) // CODE_STRIDE
    n_layer, dim, hidden = rel["arch"]
    return {"model": {"generator": dict(hidden_size=dim, num_hidden_layers=n_layer, num_attention_heads=16,
                                        intermediate_size=hidden, image_seq_len=side * side,
                                        condition_num_classes=1000, dropout=0.1, attn_drop=0.1, use_checkpoint=False),
                      "vq_model": {"codebook_size": 1024}}}


def architecture(cfg: dict) -> tuple:
    g = cfg["model"]["generator"]
    return g["num_hidden_layers"], g["hidden_size"], g["intermediate_size"]


def infer_size(sd: dict) -> str | None:
    """The released size with the weights' depth, width and MLP width (heads are 16 in every release)."""
    emb, fc1 = sd.get("embeddings.weight"), sd.get("blocks.0.mlp.fc1.weight")
    if emb is None or fc1 is None:
        return None
    depth = len([k for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k)])
    return next((s for s, rel in RELEASES.items() if rel["arch"] == (depth, emb.shape[1], fc1.shape[0])), None)


def resize_config(cfg: dict, image_size: int) -> dict:
    side = image_size // CODE_STRIDE
    model = cfg["model"]
    return {**cfg, "model": {**model, "generator": {**model["generator"], "image_seq_len": side * side}}}


def model_config(cfg: dict) -> dict:
    g = cfg["model"]["generator"]
    n = g["image_seq_len"]
    side = math.isqrt(n)
    return dict(variant=VARIANT, flavour="rar_vit", size="debug", dim=g["hidden_size"], n_layer=g["num_hidden_layers"],
                n_head=g["num_attention_heads"], ffn_hidden=g["intermediate_size"],
                num_classes=g["condition_num_classes"], grid=[side, side], class_dropout=0.1,
                backbone=dict(dropout=g.get("dropout", 0.1), attn_dropout=g.get("attn_drop", 0.1)))


def vocab_size(cfg: dict) -> int:
    return cfg["model"]["vq_model"]["codebook_size"]


def to_ours(sd: dict) -> dict:
    return dict(sd)


def to_official(sd: dict) -> dict:
    return dict(sd)


def trace_settings(inputs: dict) -> dict:
    """A decode-trace file's generate() arguments -> our sample settings."""
    cfg = inputs["cfg"]
    return dict(SAMPLE_DEFAULTS, num_steps=inputs["num_steps"], cfg_scale=float(cfg["guidance_scale"]),
                cfg_power=float(cfg.get("guidance_scale_pow", 1.0)))
