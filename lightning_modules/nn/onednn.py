"""oneDNN linears on a CPU: prepacked weights for sampling (``sample.kernels``), and a dense training linear
with its own backward (``trainer.kernels``).

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

Training has the same problem at full batch: forward, input-grad and weight-grad GEMMs of a mid-size step run at
166-213 GFLOP/s through torch (MKL) and 276-465 through oneDNN on the dense, unpacked weight (the weights change
every step, so nothing is packed). torch has no switch for it (oneDNN takes fp32 matmuls only when told to round
them to bf16/tf32), so ``roar::dense_linear`` is a custom op with a registered backward, and ``OneDnnLinear``
is the ``nn.Linear`` whose training forward calls it (tests/test_onednn_training.py).
"""
from __future__ import annotations

import torch
from torch import nn

# auto packs a linear only from this many weight entries up: oneDNN's call costs ~10 us more than aten's, which a
# small matrix never wins back (measured: 128x128 and 512x128 are faster through aten at 1-8 rows; 1536x512 and
# the 16384x128 head are 1.7-3x faster packed). Training takes the same rule (trainer.kernels=auto), which keeps
# the debug and demo models, and every result recorded with them, on torch's kernels.
AUTO_MIN_ENTRIES = 1 << 17


KERNELS = ("auto", "aten", "onednn")  # sample.kernels / trainer.kernels (hparams.Kernels)


def unavailable(device, dtype: torch.dtype) -> str | None:
    """None when oneDNN's linear can run ``dtype`` on ``device``; otherwise why not (one line)."""
    if torch.device(device).type != "cpu":
        return f"oneDNN's linear runs on a CPU, and this backbone is on {torch.device(device).type}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bf16 matmul (AVX-512 BF16 / AMX), which oneDNN's bf16 linear needs"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's linear is used for fp32 and bf16 weights, not {dtype}"
    return None


def kernel_threshold(kernels: str, device, dtype: torch.dtype, key: str) -> int | None:
    """``key`` (sample.kernels or trainer.kernels) -> the smallest linear (weight entries) that runs through oneDNN,
    or None for none (torch's own kernels). auto: oneDNN on a CPU that runs it, for the linears big enough to win
    (AUTO_MIN_ENTRIES); aten everywhere else (on CUDA cuBLAS is the kernel). onednn: every linear, or one line
    saying why it cannot run here."""
    if kernels not in KERNELS:
        raise ValueError(f"{key}: unknown kernels {kernels!r} (choose from {list(KERNELS)})")
    if kernels == "aten":
        return None
    why = unavailable(device, dtype)
    if kernels == "onednn" and why is not None:
        raise ValueError(f"{key}=onednn: {why}")
    if why is not None:
        return None
    return 0 if kernels == "onednn" else AUTO_MIN_ENTRIES


def _linear_on_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    """x [..., in] -> [..., out] through oneDNN's linear on x's rows; ``weight`` is dense [out, in] (any strides) or
    prepacked. The body of both custom ops below (an empty batch gives an empty result)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


@torch.library.custom_op("roar::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [..., in] @ packed^T (+ bias) -> [..., out]; ``packed`` is ``torch.ops.mkldnn._reorder_linear_weight``'s."""
    return _linear_on_rows(x.contiguous(), packed, bias, out_features)


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


@torch.library.custom_op("roar::dense_linear", mutates_args=())
def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN on the dense weight: x [..., in], weight [out, in] -> [..., out]."""
    return _linear_on_rows(x, weight, bias, weight.shape[0])


@dense_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _dense_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _dense_linear_backward(ctx, grad_out):
    """The three gradients of y = x W^T + b: each GEMM is ``dense_linear`` again on transposed views (oneDNN reads
    their strides: no input is copied; a wide weight's grad is made contiguous once), the bias grad a sum."""
    x, weight = ctx.saved_tensors
    g = grad_out.reshape(-1, grad_out.shape[-1])  # [rows, out]
    rows = x.reshape(-1, x.shape[-1])  # [rows, in]
    grad_x = dense_linear(g, weight.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None  # g @ W
    grad_w = None
    if ctx.needs_input_grad[1] and rows.shape[0] == 0:
        grad_w = torch.zeros_like(weight)
    elif ctx.needs_input_grad[1]:  # g^T x, taken as (x^T g)^T when out > in: measured faster for wide outputs
        grad_w = (dense_linear(rows.t(), g.t(), None).t().contiguous() if weight.shape[0] > weight.shape[1]
                  else dense_linear(g.t(), rows.t(), None))
    grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


dense_linear.register_autograd(_dense_linear_backward, setup_context=_dense_linear_setup)


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` whose forward *with autograd on* (training) runs ``roar::dense_linear`` on fp32 CPU
    tensors. Everything else is torch's own linear: under autocast (bf16-mixed on a CPU already runs oneDNN's bf16
    linear), off the CPU, and without grad, so validation, the NLL evaluations and sampling (``sample.kernels``)
    give the numbers they give with ``trainer.kernels=aten``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")):
            return dense_linear(x, self.weight, self.bias)
        return super().forward(x)


def use_for_training(module: nn.Module, min_entries: int) -> int:
    """Turn every ``nn.Linear`` of ``module`` with >= ``min_entries`` weights into a ``OneDnnLinear``; -> how many.
    The class is switched in place, not the module replaced: the parameters stay the same objects, so state_dict
    keys, optimizer groups and DeepSpeed's hooks see exactly what they would with torch's linear."""
    linears = [m for m in big_linears(module, min_entries) if type(m) is nn.Linear]
    for m in linears:
        m.__class__ = OneDnnLinear
    return len(linears)


def big_linears(backbone: nn.Module, min_entries: int) -> list[nn.Linear]:
    """The ``nn.Linear`` modules of ``backbone`` with >= ``min_entries`` weights (what a sampling copy packs)."""
    return [m for m in backbone.modules() if isinstance(m, nn.Linear) and m.weight.numel() >= min_entries]


def packed_replacements(linears: list[nn.Linear], dtype: torch.dtype) -> dict[int, nn.Module]:
    """id(linear) -> its PackedLinear: a ``copy.deepcopy`` memo, so the copy takes the packed module in place of the
    linear and never copies the dense weight (a sampling copy of an L-size model would otherwise hold three copies
    of its linears at once)."""
    return {id(m): PackedLinear(m, dtype) for m in linears}
