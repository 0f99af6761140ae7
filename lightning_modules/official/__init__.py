"""Importers for officially released weights (LlamaGen GPT, RandAR, ARPG, RAR, LlamaGen VQ, MaskGIT VQGAN).

Every fact about a family lives in its module; the CLIs only call this interface.
Generator families (llamagen_gpt, randar, arpg, rar):
    RELEASES            {size: {"arch": tuple, "image_size": px, "sample": published sampling row for that size}}
    NAME_PREFIXES       preset prefixes accepted by --config ("gpt" in GPT-L); the first one names presets in errors
    DEFAULT_TOKENIZER   the tokenizer family the releases were trained on (--tokenizer-path without --tokenizer-family)
    SAMPLE_DEFAULTS     the official sampling settings of the family (a size's RELEASES row goes on top)
    official_config(size, image_size=None)  official constructor arguments of a released size
    architecture(cfg)   the tuple that RELEASES[size]["arch"] holds, read from official constructor arguments
    infer_size(sd)      the released size an official state dict has, else None
    resize_config(cfg, image_size)          the official arguments for another resolution (--image-size)
    vocab_size(cfg)     codebook size predicted; model_config(cfg) our `model` section
    to_ours(sd) / to_official(sd)           state-dict names (and layouts) both ways
    trace_settings(inputs)                  a decode trace's generate() arguments -> our sample settings
``generators`` builds / loads them strictly.
Tokenizer families (llamagen_vq, maskgit_vq): DEFAULT_PRESET and ``load_official(path, preset, prefer_ema,
overrides)``, into ``tokenizers/``.
``checkpoint_io`` reads files safely (never unpickling objects); ``parity`` runs the parity fixtures and decode
traces of tests/assets/parity. CLIs: experiments.import_official, experiments.parity (docs/official.md).
"""
import importlib

# family -> (kind, module under lightning_modules.official); the CLIs validate --family against this
FAMILIES = {
    "llamagen_gpt": ("generator", "llamagen_gpt"),
    "randar": ("generator", "randar"),
    "arpg": ("generator", "arpg"),
    "rar": ("generator", "rar"),
    "llamagen_vq": ("tokenizer", "llamagen_vq"),
    "maskgit_vq": ("tokenizer", "maskgit_vq"),
}
GENERATORS = tuple(f for f, (kind, _) in FAMILIES.items() if kind == "generator")
TOKENIZERS = tuple(f for f, (kind, _) in FAMILIES.items() if kind == "tokenizer")
# Every released generator predicts the codes of a 16x-downsampling tokenizer (LlamaGen vq_ds16, MaskGIT f16), so
# an image side in pixels over this is the side of its code grid.
CODE_STRIDE = 16


def module_of(family: str):
    """The module of a registered family, imported on first use (tokenizer modules pull in their models)."""
    return importlib.import_module(f"{__name__}.{FAMILIES[family][1]}")
