"""Build a tokenizer by kind name. New tokenizers register here (one line each)."""
from __future__ import annotations

import importlib
import inspect
import re

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
    """ValueError naming ``tokenizer.options.<key>`` for an argument the factory does not take, before anything is
    built (a factory with ``**config`` names its options through its ``check_options``)."""
    make = factory(kind)
    if hasattr(make, "check_options"):
        try:
            make.check_options(**kwargs)
        except ValueError as err:  # "tokenizer.<key>: ..." -> the config key it came from
            raise ValueError(re.sub(r"^tokenizer\.", "tokenizer.options.", str(err))) from None
        return
    params = inspect.signature(make).parameters
    for key in kwargs:
        if key not in params:
            raise ValueError(f"tokenizer.options.{key}: not an option of the {kind} tokenizer (it takes "
                             f"{', '.join(params) or 'none'})")


def build_tokenizer(kind: str, **kwargs) -> ImageTokenizer:
    check_options(kind, **kwargs)
    tok = factory(kind)(**kwargs)
    tok.eval().requires_grad_(False)
    return tok
