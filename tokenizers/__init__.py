"""roar's image tokenizers.

Import name clash: Hugging Face's ``tokenizers`` (needed by ``transformers``) has the same top-level name.
When both are importable, this package *merges* with it: HF's directory is appended to ``__path__`` and HF's
``__init__`` runs in this namespace, so ``tokenizers.Tokenizer`` / ``tokenizers.models`` keep working for
``transformers`` while ``tokenizers.vq`` etc. are ours. Our public API therefore lives in submodules
(``tokenizers.registry``, ``tokenizers.pixel``, ...) whose names do not collide with HF's.
The reverse case (HF imported first) is handled by ``lightning_modules.compat``.
"""
import os as _os
import sys as _sys

_HERE = _os.path.dirname(_os.path.realpath(__file__))


def _find_hf_tokenizers():
    for entry in _sys.path:
        cand = _os.path.join(entry or _os.getcwd(), "tokenizers")
        init = _os.path.join(cand, "__init__.py")
        if _os.path.isfile(init) and _os.path.realpath(cand) != _HERE:
            return _os.path.realpath(cand)
    return None


_hf_dir = _find_hf_tokenizers()
if _hf_dir is not None and _hf_dir not in __path__:
    __path__.append(_hf_dir)
    with open(_os.path.join(_hf_dir, "__init__.py")) as _f:
        exec(compile(_f.read(), _os.path.join(_hf_dir, "__init__.py"), "exec"), globals())
