"""RAR (bytedance/1d-tokenizer @ 942a96f, `modeling/rar.py`) -> roar `rar` on the `rar_vit` flavour.

Our rar_vit backbone keeps the official parameter names, so the mapping is the identity. The official
config is nested (model.generator.*, model.vq_model.codebook_size). Official sampling defaults (RAR-B release):
raster order, pow-cosine CFG g=16.0 p=2.75, temperature 1.0, no top-k / top-p (rar.md §5).
"""
from __future__ import annotations

import math

FAMILY = "rar"
VARIANT = "rar"
SAMPLE_DEFAULTS = dict(schedule="one_per_step", cfg_schedule="pow_cosine", cfg_scale=16.0, cfg_power=2.75,
                       temperature=1.0, top_k=0, top_p=1.0, mode="official")
# Released per-size sampling settings (guidance scale, power, temperature), paper Tab. 6.
RELEASED_SAMPLING = {"B": (16.0, 2.75, 1.0), "L": (15.5, 2.5, 1.02), "XL": (6.9, 1.5, 1.02), "XXL": (8.0, 1.2, 1.02)}


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
