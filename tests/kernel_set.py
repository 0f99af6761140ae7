"""Which CPU kernel set a numerics record was taken on. Two machines with different kernel sets (AVX2 vs AVX512, or
another CPU model under the same dispatch) reorder reductions, so the same code rounds differently in the last bits;
a record is bit-exact only on its own kernel set and is compared within rounding elsewhere."""
from __future__ import annotations

import torch

from experiments.bench import cpu_model


def kernel_set() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model(),
            "torch": torch.__version__}


def same_kernel_set(record: dict) -> bool:
    """True when every kernel-set field the record carries equals this machine's (older records carry fewer)."""
    here = kernel_set()
    keys = [k for k in here if k in record]
    return bool(keys) and all(record[k] == here[k] for k in keys)
