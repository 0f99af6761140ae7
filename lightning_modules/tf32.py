"""TF32 on CUDA (``trainer.tf32``, ``sample.tf32``; both on by default): the official LlamaGen and ARPG trainers and
samplers (``train_c2i.py``, ``sample_c2i_ddp.py``: ``torch.backends.cuda.matmul.allow_tf32 = True``, cuDNN likewise)
and RAR's (docs/methods/rar.md) run their fp32 matmuls and convolutions in TF32 (RandAR's scripts were not at hand to
check), so roar does too, scoped to a training run or a generation so that nothing outside it changes. On a CPU the
flags change nothing. Parity checks, tokenizers (tokenizers/base.py) and scores' feature extraction
(metrics/extractors.py) run with it off.

The legacy flags, on purpose: ``torch.set_float32_matmul_precision`` would also switch oneDNN's CPU matmuls
(``torch.backends.mkldnn.matmul.fp32_precision``), and setting the newer ``fp32_precision`` API makes the legacy
getters raise, which Lightning's CUDA accelerator and ThroughputMonitor call (``torch.get_float32_matmul_precision``).
The state is *read* through the newer getters, which answer in every state.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def tf32_state() -> tuple[bool, bool]:
    """(cuBLAS matmuls, cuDNN convolutions): whether each runs fp32 in TF32 now."""
    b = torch.backends
    return b.cuda.matmul.fp32_precision == "tf32", b.cudnn.conv.fp32_precision == "tf32"


def _set(matmul: bool, conv: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = conv


@contextmanager
def cuda_tf32(enabled: bool):
    """TF32 for CUDA fp32 matmuls and cuDNN convolutions inside, the previous state restored on exit."""
    before = tf32_state()
    _set(bool(enabled), bool(enabled))
    try:
        yield
    finally:
        _set(*before)
