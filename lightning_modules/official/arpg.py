"""ARPG (hp-l33/ARPG @ 1a1758c) -> roar `arpg` on the llama flavour with cross layers.

Official layout (randar_arpg.md §2.1, §4.1): one table ``embeddings`` of V + 1 + C + 2 rows = codes | [MASK] |
classes | null | unused; separate to_q/to_k/to_v/proj (ours: fused wqkv/wo); ``layers.self_dec`` /
``layers.cross_dec``; the shared ``layers.norm``, ``layers.to_k``, ``layers.to_v`` (ours: kv_norm, fused to_kv).
The never-used last embedding row is checked to exist and dropped; exported as zeros.
Official sampling defaults: 64 steps, arccos schedule, linear CFG on the count including the step, temperature 1,
top-k/top-p off (they are parsed but never passed in the official script).
"""
from __future__ import annotations

import re

import torch

from lightning_modules.official import llamagen_gpt

FAMILY = "arpg"
VARIANT = "arpg"
SAMPLE_DEFAULTS = dict(schedule="arccos", num_steps=64, cfg_schedule="linear", cfg_scale=5.0, temperature=1.0,
                       top_k=0, top_p=1.0, mode="official")
BLOCK = {"attn.proj": "attention.wo", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
         "ffn.w1": "feed_forward.w1", "ffn.w2": "feed_forward.w2", "ffn.w3": "feed_forward.w3"}
NAME_PREFIXES = ("arpg",)
DEFAULT_TOKENIZER = llamagen_gpt.DEFAULT_TOKENIZER
# Released at 256 px, each size with its published CFG scale (randar_arpg.md §3).
RELEASES = {s: dict(arch=llamagen_gpt.ARCHITECTURES[s], image_size=256, sample=dict(cfg_scale=g))
            for s, g in (("L", 5.0), ("XL", 6.0), ("XXL", 7.5))}
# One shared table instead of tok_embeddings; n_layer counts the self- and the cross-attention layers.
EMBEDDING_KEY = "embeddings.weight"
LAYER_KEY = r"layers\.(self_dec|cross_dec)\.\d+\.ffn_norm\.weight"
architecture, resize_config, vocab_size = llamagen_gpt.architecture, llamagen_gpt.resize_config, llamagen_gpt.vocab_size


def official_config(size: str, image_size: int | None = None) -> dict:
    return llamagen_gpt.model_args(RELEASES, size, image_size)


def infer_size(sd: dict) -> str | None:
    return llamagen_gpt.size_from_weights(sd, RELEASES, EMBEDDING_KEY, LAYER_KEY)


def model_config(cfg: dict) -> dict:
    return {**llamagen_gpt.model_config(cfg), "variant": VARIANT}


def _split_vocab(cfg_rows: int, vocab: int) -> tuple[int, int]:
    classes = cfg_rows - vocab - 3
    if classes <= 0:
        raise ValueError(f"arpg checkpoint: embeddings.weight has {cfg_rows} rows, too few for vocabulary {vocab}")
    return vocab, classes


def to_ours(sd: dict) -> dict:
    vocab = sd["head.weight"].shape[0]
    emb = sd["embeddings.weight"]
    V, C = _split_vocab(emb.shape[0], vocab)
    out = {"tok_embeddings.weight": emb[:V], "query_token": emb[V:V + 1],
           "cls_embedding.weight": emb[V + 1:V + C + 2], "kv_norm.weight": sd["layers.norm.weight"],
           "norm.weight": sd["norm.weight"], "output.weight": sd["head.weight"],
           "to_kv.weight": torch.cat([sd["layers.to_k.weight"], sd["layers.to_v.weight"]], 0)}
    consumed = {"embeddings.weight", "layers.norm.weight", "norm.weight", "head.weight", "layers.to_k.weight",
                "layers.to_v.weight"}
    for key in sd:
        m = re.fullmatch(r"layers\.(self_dec|cross_dec)\.(\d+)\.(.+)\.weight", key)
        if m is None:
            continue
        part, i, rest = m.groups()
        prefix = f"layers.{i}." if part == "self_dec" else f"cross.{i}."
        if rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
            if part == "cross_dec" and rest == "attn.to_q":
                out[prefix + "attention.wq.weight"] = sd[key]
            elif part == "self_dec" and rest == "attn.to_q":
                base = f"layers.self_dec.{i}.attn."
                out[prefix + "attention.wqkv.weight"] = torch.cat(
                    [sd[base + "to_q.weight"], sd[base + "to_k.weight"], sd[base + "to_v.weight"]], 0)
                consumed.update({base + "to_k.weight", base + "to_v.weight"})
            else:
                continue  # to_k/to_v of self layers are consumed with to_q; cross layers have none
        elif rest in BLOCK:
            out[prefix + BLOCK[rest] + ".weight"] = sd[key]
        else:
            continue
        consumed.add(key)
    leftover = sorted(set(sd) - consumed)
    if leftover:
        raise ValueError(f"arpg checkpoint: unexpected keys {leftover}")
    return out


def to_official(sd: dict) -> dict:
    """Ours -> official names and shapes (used to check our module tree against the released key set)."""
    d = sd["tok_embeddings.weight"].shape[1]
    emb = torch.cat([sd["tok_embeddings.weight"], sd["query_token"], sd["cls_embedding.weight"],
                     torch.zeros(1, d, dtype=sd["tok_embeddings.weight"].dtype,
                                 device=sd["tok_embeddings.weight"].device)], 0)
    k, v = sd["to_kv.weight"].chunk(2, 0)
    out = {"embeddings.weight": emb, "layers.norm.weight": sd["kv_norm.weight"], "layers.to_k.weight": k,
           "layers.to_v.weight": v, "norm.weight": sd["norm.weight"], "head.weight": sd["output.weight"]}
    inv = {v2: k2 for k2, v2 in BLOCK.items()}
    for key, value in sd.items():
        m = re.fullmatch(r"(layers|cross)\.(\d+)\.(.+)\.weight", key)
        if m is None:
            continue
        part, i, rest = m.groups()
        prefix = f"layers.self_dec.{i}." if part == "layers" else f"layers.cross_dec.{i}."
        if rest == "attention.wqkv":
            q, kk, vv = value.chunk(3, 0)
            out.update({prefix + "attn.to_q.weight": q, prefix + "attn.to_k.weight": kk,
                        prefix + "attn.to_v.weight": vv})
        elif rest == "attention.wq":
            out[prefix + "attn.to_q.weight"] = value
        elif rest in inv:
            out[prefix + inv[rest] + ".weight"] = value
    return out


def trace_settings(inputs: dict) -> dict:
    """A decode-trace file's generate() arguments -> our sample settings."""
    cfg = inputs["cfg"]
    return dict(SAMPLE_DEFAULTS, num_steps=inputs["num_steps"], cfg_scale=float(cfg["guidance_scale"]),
                cfg_schedule=cfg.get("cfg_schedule", "linear"), schedule=cfg.get("sample_schedule", "arccos"))
