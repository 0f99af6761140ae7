"""Model FLOPs of a training step, counted analytically from the ``Seq`` layout, and the device's matmul peak.

One count for the benchmark (experiments/bench_train.py) and for MFU while training (callbacks/throughput.py):

    forward  = sum over matmuls of 2 * weights * rows it is applied to     (slots, queries or output positions)
             + per attention layer 4 * D * visible (query, key) pairs      (QK^T and PV; masked pairs not counted)
    training = 3 * forward                                                 (backward: dX and dW per matmul)

Embedding lookups, norms, RoPE, softmax, biases, the loss and the optimizer are not counted (their time is in the
step); gradient-checkpointing recompute is not counted either (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

import time

import torch
from torch import nn

PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def linear_weights(module: nn.Module) -> int:
    # ds_numel: under DeepSpeed ZeRO-3 a parameter's own tensor is an empty placeholder for this rank's slice
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in module.modules() if isinstance(m, nn.Linear))


def visible_pairs(mask, rows: torch.Tensor | None, batch: int, num_keys: int | None = None) -> int:
    """(query, key) pairs attention computes over the batch: mask None = causal over ``rows`` (keys = the slots
    themselves), or the True entries of a bool mask [B|1, 1, Lq, Lk]; num_keys without a mask = all keys visible."""
    if mask is None and num_keys is not None:
        return batch * rows.shape[0] * num_keys
    if mask is None:
        return batch * int((rows[None, :] <= rows[:, None]).sum())
    return int(mask.sum()) * (batch if mask.shape[0] == 1 else 1)


def forward_flops(backbone: nn.Module, seq, prep=None) -> dict:
    """Forward matmul FLOPs of one ``backbone(seq)``, split into body / attention / head: cache-less (training), or
    one cached decode step when ``prep`` (attention.StaticPrep) is given — its masks (over the step's bucketed
    key count) are exactly the keys the step attends to, so attention counts the visible cache length, not the
    cache size."""
    B, L = seq.kind.shape
    D = backbone.dim
    width = lambda out, n: n if out is None else out.shape[-1]  # outputs per sample  # noqa: E731
    if hasattr(backbone, "blocks"):  # rar_vit: a learned cls prefix slot joins any forward holding row 0
        rows = seq.rows + 1
        if (prep.prefix if prep is not None else bool((seq.rows == 0).any())):
            rows = torch.cat([rows.new_zeros(1), rows])
        n = rows.shape[0]
        body = 2 * sum(linear_weights(b) for b in backbone.blocks) * B * n  # incl. the per-slot AdaLN linear
        attn = len(backbone.blocks) * 4 * D * visible_pairs(None if prep is None else prep.mask, rows, B)
        M = width(seq.out, L)
        head = 2 * (linear_weights(backbone.adaln_before_head) + linear_weights(backbone.lm_head)) * B * M
    else:
        body = 2 * sum(linear_weights(layer) for layer in backbone.layers) * B * L
        attn = len(backbone.layers) * 4 * D * visible_pairs(seq.mask if prep is None else prep.mask, seq.rows, B)
        M = width(seq.out, L)
        if backbone.cross is not None:  # ARPG: shared K/V over the content slots, then Q queries
            Q = seq.query_pos.shape[1]
            body += 2 * linear_weights(backbone.to_kv) * B * L
            body += 2 * sum(linear_weights(c) for c in backbone.cross) * B * Q
            pairs = (visible_pairs(seq.query_mask, torch.arange(Q), B, num_keys=L) if prep is None
                     else visible_pairs(prep.query_mask, None, B))
            attn += len(backbone.cross) * 4 * D * pairs
            M = width(seq.out, Q)
        head = 2 * linear_weights(backbone.output) * B * M
    return {"body": body, "attention": attn, "head": head, "total": body + attn + head}


def train_flops(module, codes: torch.Tensor, labels: torch.Tensor) -> dict:
    """Model FLOPs of one training step (3 x forward) for this ordering's training layout."""
    seq, _ = module.ordering.train_inputs(codes, labels, 0, module.generator(0))
    fwd = forward_flops(module.backbone, seq)
    return {"slots": seq.kind.shape[1], "forward": fwd, "total": 3 * fwd["total"]}


@torch.no_grad()
def batch_train_flops(module, batch_size: int) -> int:
    """Model FLOPs of one training step on ``batch_size`` samples (the layout, not the codes, sets the count)."""
    n = module.num_positions
    codes = torch.zeros(batch_size, n, dtype=torch.long, device=module.device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=module.device)
    return int(train_flops(module, codes, labels)["total"])


# ---------------------------------------------------------------------------------------------- the ceiling
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, device, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds) of ``fn`` over ``repeats`` calls after one warm-up call (thread
    pool, packing buffers, cuBLAS handles, oneDNN primitives)."""
    fn()
    sync(device)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return best, best_cpu


def square_gemms(device, name: str, n: int) -> dict:
    """library -> a callable multiplying two [n, n] ``name`` matrices: torch's matmul (MKL on a CPU, cuBLAS on a
    GPU), and on a CPU that runs it oneDNN with one operand prepacked — the kernel sampling uses
    (nn/onednn.py), which on some CPUs is twice as fast as MKL for the same fp32 product, so the ceiling MFU is read
    against is the best the machine reaches, not one library's."""
    from lightning_modules.nn.onednn import unavailable

    dtype = PEAK_DTYPES[name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = {"aten": lambda: a @ b}
    if unavailable(device, dtype) is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(b, None)  # linear(a, b) = a @ b^T: the same 2 n^3 FLOPs
        out["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    return out


def matmul_gflops(device="cpu", dtypes=("fp32", "bf16"), sizes=(1024, 2048, 4096), repeats: int = 3) -> dict:
    """Best GFLOP/s of one square [n, n] @ [n, n] (2 n^3 FLOPs) per dtype name over the libraries of
    ``square_gemms``: the ceiling MFU is measured against (``by_library`` keeps each library's best).

    ``gflops`` is per wall second; ``gflops_per_cpu_s`` per second of this process's CPU time (all threads), the
    matching ceiling for the load-robust ``mfu_cpu`` (CPU only: on a shared machine wall time includes waiting)."""
    out = {}
    for name in dtypes:
        per_n, per_cpu, by_library = {}, {}, {}
        for n in sizes:
            for library, gemm in square_gemms(device, name, n).items():
                best, best_cpu = best_seconds(gemm, device, repeats)
                flops = 2 * n ** 3
                per_n[str(n)] = max(per_n.get(str(n), 0.0), round(flops / best / 1e9, 1))
                per_cpu[str(n)] = max(per_cpu.get(str(n), 0.0), round(flops / max(best_cpu, 1e-9) / 1e9, 1))
                by_library[library] = max(by_library.get(library, 0.0), round(flops / best / 1e9, 1))
        out[name] = {"gflops": max(per_n.values()), "per_n": per_n, "gflops_per_cpu_s": max(per_cpu.values()),
                     "by_library": by_library}
    return out


def stream_gbps(device="cpu", mb: int = 256, repeats: int = 3) -> dict:
    """Best GB/s reading ``mb`` MB once (more than a CPU's last-level cache): a sum, and on a CPU oneDNN's
    one-row linear over a packed weight (what a batch-1 decode step is) — the bandwidth side of the roofline floor
    (bench.add_mfu). ``gbps`` is the best; ``by_kernel`` keeps each."""
    from lightning_modules.nn.onednn import unavailable

    side = int((mb * 2 ** 20 / 4) ** 0.5)
    w = torch.randn(side, side, device=device)  # [side, side] fp32 = mb MB
    kernels = {"sum": lambda: w.sum()}
    if unavailable(device, torch.float32) is None:
        packed, row = torch.ops.mkldnn._reorder_linear_weight(w, None), torch.randn(1, side)
        kernels["onednn_gemv"] = lambda: torch.ops.mkldnn._linear_pointwise(row, packed, None, "none", [], "")
    by_kernel = {name: round(w.numel() * 4 / best_seconds(read, device, repeats)[0] / 1e9, 1)
                 for name, read in kernels.items()}
    return {"gbps": max(by_kernel.values()), "by_kernel": by_kernel}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for ``dtype``, where it came from); (None, why) where MFU is not defined.

    GPU: Lightning's spec-sheet table (``get_available_flops``); a GPU it does not list (e.g. an H200 that reports
    itself as "NVIDIA H200": the table only matches "sxm1" / "nvl1") gets its matmul peak measured here, once.
    CPU: none. A CPU has no spec peak in the table, and a matmul peak measured at start-up swings 2-3x with the load
    of a shared machine (docs/benchmarks.md), so the MFU would not mean anything; `experiments.bench train` gives
    a CPU MFU against a peak measured right beside the timed steps instead."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"no MFU on {device.type}: no spec peak, and a measured one drifts with the machine's load"
    import warnings

    from lightning.fabric.utilities.throughput import get_available_flops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FLOPs not found for ...": handled below
        table = get_available_flops(device, dtype)
    if table:
        return float(table), f"Lightning's spec table for {torch.cuda.get_device_name(device)}"
    name = next((k for k, v in PEAK_DTYPES.items() if v == dtype), None)
    if name is None:
        return None, f"no MFU: {torch.cuda.get_device_name(device)} is not in Lightning's table and {dtype} has no " \
                     f"matmul probe"
    peak = matmul_gflops(device, (name,), sizes=(4096, 8192))[name]["gflops"] * 1e9
    return peak, f"measured {name} matmul peak of {torch.cuda.get_device_name(device)} (not in Lightning's table)"
