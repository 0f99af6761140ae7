"""oneDNN linears with their weights prepacked once, for sampling on a CPU (``sample.kernels``).

Why roar packs its own: on a CPU torch's fp32 ``F.linear`` runs MKL's sgemm, which takes a decode step's thin GEMMs
(1-64 rows against a whole weight matrix) far below the memory and compute floor — measured on the project's AMD
EPYC: 2 rows x 100 MB of weights in 8.4 ms through ``F.linear``, 1.3-2.2 ms through oneDNN with the weights in its
blocked layout; and square fp32 GEMMs at half the speed oneDNN reaches on the same cores (docs/benchmarks.md).
torch hands oneDNN's prepacked linear only to inductor's freezing pass (which picks MKL for fp32 and needs the
weights as graph constants), so the sampling copy of a backbone (``sampling.sampling_backbone``) swaps its
``nn.Linear`` modules for ``PackedLinear`` here. Same fp32 (or bf16) arithmetic in another summation order: logits
equal to rounding, the same tokens for the same seed (tests/test_onednn_sampling.py). Inference only (no autograd).

A custom op (``roar::onednn_linear``) wraps the call so ``torch.compile`` (the fast decode path) keeps it as one
opaque kernel with the packed tensor as an input: inductor's own lowering of the aten op insists on a constant.
"""
from __future__ import annotations

import torch
from torch import nn

# auto packs a linear only from this many weight entries up: oneDNN's call costs ~10 us more than aten's, which a
# small matrix never wins back (measured: 128x128 and 512x128 are faster through aten at 1-8 rows; 1536x512 and
# the 16384x128 head are 1.7-3x faster packed).
AUTO_MIN_ENTRIES = 1 << 17


def unavailable(device, dtype: torch.dtype) -> str | None:
    """None when oneDNN's prepacked linear can run ``dtype`` on ``device``; otherwise why not (one line)."""
    if torch.device(device).type != "cpu":
        return f"oneDNN's prepacked linear runs on a CPU, and this backbone is on {torch.device(device).type}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bf16 matmul (AVX-512 BF16 / AMX), which oneDNN's bf16 linear needs"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's prepacked linear is used for fp32 and bf16 weights, not {dtype}"
    return None


@torch.library.custom_op("roar::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [..., in] @ packed^T (+ bias) -> [..., out]; ``packed`` is ``torch.ops.mkldnn._reorder_linear_weight``'s."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


@onednn_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s forward with its weight cast to ``dtype`` and reordered once into oneDNN's layout. The
    packed tensor is a plain attribute, not a parameter: this module only ever lives in a sampling copy."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(dtype)  # [out, in]
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype).clone()  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.packed_weight, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def big_linears(backbone: nn.Module, min_entries: int) -> list[nn.Linear]:
    """The ``nn.Linear`` modules of ``backbone`` with >= ``min_entries`` weights (what a sampling copy packs)."""
    return [m for m in backbone.modules() if isinstance(m, nn.Linear) and m.weight.numel() >= min_entries]


def packed_replacements(linears: list[nn.Linear], dtype: torch.dtype) -> dict[int, nn.Module]:
    """id(linear) -> its PackedLinear: a ``copy.deepcopy`` memo, so the copy takes the packed module in place of the
    linear and never copies the dense weight (a sampling copy of an L-size model would otherwise hold three copies
    of its linears at once)."""
    return {id(m): PackedLinear(m, dtype) for m in linears}
