"""Make ``import tokenizers.<ours>`` work beside Hugging Face's ``tokenizers``, in a checkout and in a wheel.

Why this exists: roar's image tokenizers live in a folder called ``tokenizers/``, the import name of Hugging
Face's text tokenizers too (which ``transformers`` needs). roar's code imports ``tokenizers.registry``,
``tokenizers.vq`` and so on, and both packages must work in one process, whichever is imported first:

- checkout (or editable install used from the checkout): the top-level ``tokenizers`` found first is our folder,
  and its ``__init__`` merges HF's package into it (tokenizers/__init__.py).
- installed wheel (or editable install used from elsewhere): our folder is installed as ``roar_tokenizers``
  (pyproject.toml maps it), so it never overwrites HF's files in site-packages, and the top-level ``tokenizers``
  is HF's, or nobody's when HF is not installed.

The finder below closes the gap. It sits at the END of ``sys.meta_path``, so it is asked only after every
ordinary finder failed: HF's own modules (``tokenizers.models``, the compiled core, ...) are always found by
the ordinary finders first and transformers sees an untouched HF package. It answers two questions only:

- ``tokenizers.<name>`` for a module of ours (registry, vq, ...): our file, under the ``tokenizers.`` name, so
  the code keeps one copy of each module whether the parent package is HF's or ours;
- ``tokenizers`` itself when no HF package exists: our package under that name.

Every roar package ``__init__`` imports this module before anything touches ``tokenizers``. Cheap: no torch.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_MARKER = "registry.py"  # a module HF's package does not have: tells our folder from HF's


def _is_ours(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, _MARKER)) and os.path.isfile(os.path.join(directory, "__init__.py"))


def find_our_tokenizers() -> str | None:
    """Our tokenizer folder: beside this package in a checkout / editable install, else the installed
    ``roar_tokenizers`` (located without importing it, so its modules are never loaded twice)."""
    sibling = os.path.join(_ROOT, "tokenizers")
    if _is_ours(sibling):
        return sibling
    spec = importlib.util.find_spec("roar_tokenizers")
    for directory in (spec.submodule_search_locations or []) if spec else []:
        if _is_ours(directory):
            return os.path.realpath(directory)
    return None


class RoarTokenizersFinder(importlib.abc.MetaPathFinder):
    """Last-resort finder for ``tokenizers`` and ``tokenizers.<one of our modules>`` (see the module docstring)."""

    roar_tokenizers_finder = True  # how install() recognises an instance, even of a reloaded class

    def __init__(self, directory: str):
        self.directory = directory
        self.names = {n[:-3] if n.endswith(".py") else n for n in os.listdir(directory)
                      if n != "__init__.py" and (n.endswith(".py") or os.path.isfile(os.path.join(directory, n,
                                                                                                   "__init__.py")))}

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "tokenizers":  # reached only when no HF package (and no checkout folder) was found
            return importlib.util.spec_from_file_location(
                "tokenizers", os.path.join(self.directory, "__init__.py"),
                submodule_search_locations=[self.directory])
        parent, _, name = fullname.partition(".")
        if parent == "tokenizers" and name in self.names:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.directory])
        return None


def install() -> RoarTokenizersFinder | None:
    for finder in sys.meta_path:
        if getattr(finder, "roar_tokenizers_finder", False):
            return finder
    directory = find_our_tokenizers()
    if directory is None:
        return None  # roar installed without its tokenizers: `import tokenizers.registry` will say what is missing
    finder = RoarTokenizersFinder(directory)
    sys.meta_path.append(finder)
    return finder


install()
