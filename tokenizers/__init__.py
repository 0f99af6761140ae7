"""roar's image tokenizers.

Import name clash: Hugging Face's ``tokenizers`` (needed by ``transformers``) has the same top-level name.
In a checkout this folder is the ``tokenizers`` found first, so when HF's package is importable too this package
*merges* with it: HF's directory is appended to ``__path__`` and HF's ``__init__`` runs in this namespace, so
``tokenizers.Tokenizer`` / ``tokenizers.models`` keep working for ``transformers`` while ``tokenizers.vq`` etc.
are ours. Our public API therefore lives in submodules (``tokenizers.registry``, ``tokenizers.pixel``, ...) whose
names do not collide with HF's.
An installed wheel ships this folder as ``roar_tokenizers`` (it must not overwrite HF's files); there, and in the
HF-imported-first order, ``lightning_modules.compat`` serves ``tokenizers.<ours>`` from it.
"""
import os as _os
import sys as _sys

_HERE = _os.path.dirname(_os.path.realpath(__file__))


def _find_hf_tokenizers():
    for entry in _sys.path:
        cand = _os.path.realpath(_os.path.join(entry or _os.getcwd(), "tokenizers"))
        init = _os.path.join(cand, "__init__.py")
        # registry.py marks a roar folder (another checkout on sys.path): merging with it would run our own
        # __init__ twice instead of HF's
        if _os.path.isfile(init) and cand != _HERE and not _os.path.isfile(_os.path.join(cand, "registry.py")):
            return cand
    return None


# Only under the name ``tokenizers``: imported as ``roar_tokenizers`` (a wheel) nobody reaches HF's API through
# this package, and a merge would run HF's __init__ a second time, beside the real ``tokenizers`` it belongs to.
_hf_dir = _find_hf_tokenizers() if __name__ == "tokenizers" else None
if _hf_dir is not None and _hf_dir not in __path__:
    __path__.append(_hf_dir)
    with open(_os.path.join(_hf_dir, "__init__.py")) as _f:
        exec(compile(_f.read(), _os.path.join(_hf_dir, "__init__.py"), "exec"), globals())
