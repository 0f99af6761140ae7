"""LlamaGen class-conditional GPT (FoundationVision/LlamaGen @ ce98ec4) -> roar `raster` on the llama flavour.

Our llama backbone keeps LlamaGen's parameter names, so the mapping is the identity plus the class table
rename. Official sampling defaults: CFG constant (2.0 for B/L, 1.75 for XL/XXL), temperature 1, top-k 0,
top-p 1 (randar_arpg.md §3.3).
"""
from __future__ import annotations

import math
import re

from lightning_modules.official import CODE_STRIDE

FAMILY = "llamagen_gpt"
VARIANT = "raster"
SAMPLE_DEFAULTS = dict(schedule="one_per_step", cfg_schedule="constant", cfg_scale=2.0, temperature=1.0,
                       top_k=0, top_p=1.0, mode="official")
RENAMES = {"cls_embedding.embedding_table.weight": "cls_embedding.weight"}
NAME_PREFIXES = ("gpt", "llamagen")
DEFAULT_TOKENIZER = "llamagen_vq"
# Released (n_layer, n_head, dim) of the LlamaGen layout; RandAR and ARPG released some of the same sizes.
ARCHITECTURES = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536)}
# XL/XXL were released at 384 px (24x24 codes) and published with CFG 1.75 (randar_arpg.md §3.3).
RELEASES = {s: dict(arch=ARCHITECTURES[s], image_size=384 if s in ("XL", "XXL") else 256,
                    sample=dict(cfg_scale=1.75 if s in ("XL", "XXL") else 2.0)) for s in ARCHITECTURES}
EMBEDDING_KEY = "tok_embeddings.weight"
LAYER_KEY = r"layers\.\d+\.ffn_norm\.weight"  # one match per transformer layer


# ---------------------------------------------------------------- released sizes (shared by the LlamaGen layouts)
def model_args(releases: dict, size: str, image_size: int | None = None, **extra) -> dict:
    """LlamaGen ModelArgs of ``releases[size]`` (vocab 16384, 1000 classes), plus a family's ``extra`` arguments."""
    rel = releases[size]
    side = (image_size or rel["image_size"]) // CODE_STRIDE
    n_layer, n_head, dim = rel["arch"]
    return dict(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=16384, num_classes=1000, block_size=side * side,
                cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1,
                attn_dropout_p=0.0, drop_path_rate=0.0, **extra)


def official_config(size: str, image_size: int | None = None) -> dict:
    return model_args(RELEASES, size, image_size)


def architecture(cfg: dict) -> tuple:
    return cfg["n_layer"], cfg["n_head"], cfg["dim"]


def size_from_weights(sd: dict, releases: dict, embedding_key: str, layer_key: str) -> str | None:
    """The released size with the weights' width and depth (heads are not in the shapes; they follow the release)."""
    emb = sd.get(embedding_key)
    if emb is None:
        return None
    depth = len([k for k in sd if re.fullmatch(layer_key, k)])
    return next((s for s, rel in releases.items() if (rel["arch"][0], rel["arch"][2]) == (depth, emb.shape[1])), None)


def infer_size(sd: dict) -> str | None:
    return size_from_weights(sd, RELEASES, EMBEDDING_KEY, LAYER_KEY)


def resize_config(cfg: dict, image_size: int) -> dict:
    side = image_size // CODE_STRIDE
    return {**cfg, "block_size": side * side}


def vocab_size(cfg: dict) -> int:
    return cfg["vocab_size"]


# ---------------------------------------------------------------- our model section, names both ways
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
