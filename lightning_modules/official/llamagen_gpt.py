"""LlamaGen class-conditional GPT (FoundationVision/LlamaGen @ ce98ec4) -> roar `raster` on the llama flavour.

Our llama backbone keeps LlamaGen's parameter names, so the mapping is the identity plus the class table
rename. Official sampling defaults: CFG constant (2.0 for B/L, 1.75 for XL/XXL), temperature 1, top-k 0,
top-p 1 (randar_arpg.md §3.3).
"""
from __future__ import annotations

import math

FAMILY = "llamagen_gpt"
VARIANT = "raster"
SAMPLE_DEFAULTS = dict(schedule="one_per_step", cfg_schedule="constant", cfg_scale=2.0, temperature=1.0,
                       top_k=0, top_p=1.0, mode="official")
RENAMES = {"cls_embedding.embedding_table.weight": "cls_embedding.weight"}


def grid_of(num_positions: int) -> list[int]:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"official config: block_size {num_positions} is not a square grid")
    return [side, side]


def model_config(cfg: dict) -> dict:
    """Official ModelArgs dict -> our `model` section (vocabulary comes with the tokenizer section)."""
    return dict(variant=VARIANT, flavour="llama", size="debug", dim=cfg["dim"], n_layer=cfg["n_layer"],
                n_head=cfg["n_head"], num_classes=cfg["num_classes"], grid=grid_of(cfg["block_size"]),
                class_dropout=cfg.get("class_dropout_prob", 0.1),
                backbone=dict(token_dropout=cfg.get("token_dropout_p", 0.1),
                              resid_dropout=cfg.get("resid_dropout_p", 0.1),
                              ffn_dropout=cfg.get("ffn_dropout_p", 0.1), norm_eps=cfg.get("norm_eps", 1e-5)))


def rename(sd: dict, renames: dict) -> dict:
    return {renames.get(k, k): v for k, v in sd.items()}


def to_ours(sd: dict) -> dict:
    return rename(sd, RENAMES)


def to_official(sd: dict) -> dict:
    return rename(sd, {v: k for k, v in RENAMES.items()})


def trace_settings(inputs: dict) -> dict:
    """A decode-trace file's generate() arguments -> our sample settings."""
    cfg = inputs["cfg"]
    return dict(SAMPLE_DEFAULTS, num_steps=inputs["num_steps"], cfg_scale=float(cfg["cfg_scale"]))
