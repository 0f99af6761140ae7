"""Build a tokenizer by kind name. New tokenizers register here (one line each)."""
from __future__ import annotations

import importlib
import inspect

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


def factory(kind: str):
    if kind not in TOKENIZERS:
        raise ValueError(f"tokenizer.kind: unknown tokenizer {kind!r} (choose from {sorted(TOKENIZERS)})")
    module, attr = TOKENIZERS[kind].split(":")
    return getattr(importlib.import_module(module), attr)


def check_options(kind: str, **kwargs) -> None:
    """ValueError naming ``tokenizer.options.<key>`` for an argument the factory does not take (a factory with
    ``**config`` checks its own keys when it builds)."""
    params = inspect.signature(factory(kind)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            raise ValueError(f"tokenizer.options.{key}: not an option of the {kind} tokenizer (it takes "
                             f"{', '.join(params) or 'none'})")


def build_tokenizer(kind: str, **kwargs) -> ImageTokenizer:
    check_options(kind, **kwargs)
    tok = factory(kind)(**kwargs)
    tok.eval().requires_grad_(False)
    return tok
