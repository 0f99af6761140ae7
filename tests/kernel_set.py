"""Which CPU kernel set a numerics record was taken on. Two machines with different kernel sets (AVX2 vs AVX512, or
another CPU model under the same dispatch) reorder reductions, so the same code rounds differently in the last bits;
a record is bit-exact only on its own kernel set and is compared within rounding elsewhere."""
from __future__ import annotations

import torch

from experiments.bench import cpu_model, cpuinfo


def cpu_generation() -> str:
    """"family/model" from /proc/cpuinfo: a VM's model name can be as bare as "AMD EPYC" for several generations
    (an AVX-512 Zen 5 and an older AVX-512 EPYC rounded the same RAR-ViT gradients differently)."""
    fields = cpuinfo()
    return f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"


def kernel_set() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model(),
            "cpu_generation": cpu_generation(), "torch": torch.__version__}


def same_kernel_set(record: dict) -> bool:
    """True when every kernel-set field the record carries equals this machine's (older records carry fewer). A
    record that does not name its CPU model cannot claim bit identity: it is compared within rounding only."""
    here = kernel_set()
    keys = [k for k in here if k in record]
    return "cpu_model" in record and all(record[k] == here[k] for k in keys)
