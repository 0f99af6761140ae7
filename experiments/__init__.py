"""roar command-line entry points: train, sample, evaluate, ablate, bench, export, import_official, parity."""
from lightning_modules import compat as _compat  # noqa: F401
