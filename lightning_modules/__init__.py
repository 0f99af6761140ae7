"""roar LightningModules and the pure-nn pieces they wire (see docs/architecture.md)."""
from lightning_modules import compat as _compat  # noqa: F401  (tokenizers name clash, must run first)
