"""Make ``import tokenizers.<ours>`` work even when Hugging Face's ``tokenizers`` was imported first.

If HF's package already sits in ``sys.modules['tokenizers']`` (e.g. ``import transformers`` ran before roar),
our tokenizer submodules are reachable by appending our folder to its ``__path__``. Imported by every
roar package ``__init__`` before anything touches ``tokenizers``. Cheap: no torch import.
"""
import os
import sys

OUR_TOKENIZERS = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "tokenizers")


def ensure_roar_tokenizers() -> None:
    mod = sys.modules.get("tokenizers")
    if mod is None:
        return
    path = getattr(mod, "__path__", None)
    if path is not None and OUR_TOKENIZERS not in [os.path.realpath(p) for p in path]:
        path.append(OUR_TOKENIZERS)


ensure_roar_tokenizers()
