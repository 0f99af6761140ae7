"""Build a tokenizer by kind name. New tokenizers register here (one line each)."""
from __future__ import annotations

import importlib

from tokenizers.base import ImageTokenizer

# kind -> "module:factory"; factories take keyword arguments from the `tokenizer` config section.
TOKENIZERS = {
    "pixel": "tokenizers.pixel:PixelTokenizer",
    "codes": "tokenizers.pixel:CodesTokenizer",
    # VQ tokenizers: ``path`` = local weights file ("" = random init), ``preset`` + config keys otherwise.
    "llamagen_vq": "tokenizers.vq:build_llamagen_vq",
    "digits_vq": "tokenizers.vq:build_digits_vq",
    "maskgit_vq": "tokenizers.maskgit_vq:build_maskgit_vq",
}


def build_tokenizer(kind: str, **kwargs) -> ImageTokenizer:
    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer.kind: unknown tokenizer {kind!r} (choose from {sorted(TOKENIZERS)})")
    module, attr = TOKENIZERS[kind].split(":")
    tok = getattr(importlib.import_module(module), attr)(**kwargs)
    tok.eval().requires_grad_(False)
    return tok
