"""RandAR (ziqipang/RandAR @ d374a72) -> roar `randar`: LlamaGen keys plus ``pos_instruct_embeddings`` [1, d].

Official sampling defaults: 88 steps of the cosine count schedule, CFG linear from 1.0 to the end scale over the
count decoded before each step ("1.0,4.0" in sample_c2i.py), temperature 1, top-k 0, top-p 1.
"""
from __future__ import annotations

from lightning_modules.official import llamagen_gpt

FAMILY = "randar"
VARIANT = "randar"
SAMPLE_DEFAULTS = dict(schedule="randar_cosine", num_steps=88, cfg_schedule="linear", cfg_start=1.0,
                       cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0, mode="official")
RENAMES = {**llamagen_gpt.RENAMES, "pos_instruct_embeddings": "pos_instruct"}
NAME_PREFIXES = ("randar",)
DEFAULT_TOKENIZER = llamagen_gpt.DEFAULT_TOKENIZER
# Released at 256 px with one sampling setting for both sizes: SAMPLE_DEFAULTS, so no per-size row.
RELEASES = {s: dict(arch=llamagen_gpt.ARCHITECTURES[s], image_size=256, sample={}) for s in ("L", "XL")}
# The constructor arguments RandAR adds to LlamaGen's ModelArgs (as in its released configs).
EXTRA_ARGS = dict(position_order="random", num_inference_steps=88, zero_class_qk=True, grad_checkpointing=False)
architecture, resize_config, vocab_size = llamagen_gpt.architecture, llamagen_gpt.resize_config, llamagen_gpt.vocab_size


def official_config(size: str, image_size: int | None = None) -> dict:
    return llamagen_gpt.model_args(RELEASES, size, image_size, **EXTRA_ARGS)


def infer_size(sd: dict) -> str | None:
    return llamagen_gpt.size_from_weights(sd, RELEASES, llamagen_gpt.EMBEDDING_KEY, llamagen_gpt.LAYER_KEY)


def model_config(cfg: dict) -> dict:
    return {**llamagen_gpt.model_config(cfg), "variant": VARIANT}


def to_ours(sd: dict) -> dict:
    return llamagen_gpt.rename(sd, RENAMES)


def to_official(sd: dict) -> dict:
    return llamagen_gpt.rename(sd, {v: k for k, v in RENAMES.items()})


def trace_settings(inputs: dict) -> dict:
    """A decode-trace file's generate() arguments -> our sample settings."""
    cfg = inputs["cfg"]
    start, end = cfg["cfg_scales"]
    return dict(SAMPLE_DEFAULTS, num_steps=inputs["num_steps"], cfg_start=float(start), cfg_scale=float(end))
