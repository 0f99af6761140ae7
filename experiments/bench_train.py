"""Training-step benchmark: step time, tokens/s, peak memory, model FLOPs and MFU per ordering and size.

One step is what Lightning runs per batch: (autocast) forward + loss through ``ARModule.loss_on`` with the
ordering's own train_inputs, backward, the grad-norm the module logs, gradient clipping, AdamW step,
zero_grad(set_to_none). Data loading is not in it (see experiments/bench_data.py); codes are random [B, N].

Model FLOPs are counted analytically from the ``Seq`` layout (a multiply-add = 2 FLOPs) by lightning_modules/flops.py,
the same count the training run's ThroughputMonitor reports MFU with (lightning_modules/callbacks/throughput.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time

import torch

from experiments.bench import load_average, sync
# the one FLOP count (training MFU uses it too); forward_flops / train_flops stay importable from here
from lightning_modules.flops import forward_flops, linear_weights, train_flops, visible_pairs  # noqa: F401

# bench size -> (model.size preset, explicit dims). "mid" is the MFU target size: 8 layers of width 512.
BENCH_SIZES = {"debug": ("debug", {}), "small": ("small", {}), "mid": ("debug", dict(dim=512, n_layer=8, n_head=8)),
               "B": ("B", {}), "L": ("L", {})}

MEMORY_METHOD = {
    "cpu": "peak resident set (VmHWM, reset through /proc/self/clear_refs) during one step minus the resident set "
           "before it, after gc + malloc_trim (a 1 ms RSS sampling thread where the reset is refused): activations, "
           "gradients and temporaries; parameters + AdamW state are the steady `state_mb`",
    "cuda": "torch.cuda.max_memory_allocated during one step minus memory_allocated before it (activations, "
            "gradients, temporaries); parameters + AdamW state are the steady `state_mb`",
}
FLOP_METHOD = "analytic from the Seq layout: 3 x (2 x matmul weights x rows + 4 x D x visible attention pairs)"


# ---------------------------------------------------------------------------------------------- building
def bench_module(variant: str, size: str, *, flavour: str = "llama", grid: int = 16, vocab: int = 16384,
                 num_classes: int = 1000, compile: bool = False, fused_adam: bool = False, device="cpu",
                 compile_backend: str = "inductor", kernels: str = "auto"):
    """An ARModule built through the real config path (experiments.config + experiments.build)."""
    from experiments.build import build_lightning_module
    from experiments.config import load_config

    preset, dims = BENCH_SIZES[size]
    overrides = [f"model.variant={variant}", f"model.flavour={flavour}", f"model.size={preset}",
                 f"model.num_classes={num_classes}", "tokenizer.kind=codes", f"tokenizer.vocab_size={vocab}",
                 f"trainer.compile={str(bool(compile)).lower()}", f"trainer.kernels={kernels}",
                 *[f"model.{k}={v}" for k, v in dims.items()]]
    module = build_lightning_module(load_config([], overrides), (grid, grid))
    module.fused_adam = fused_adam
    module.compile_backend = compile_backend  # "eager" in the bench's --dry-run: dynamo's capture, no codegen
    return module.to(device)


# ---------------------------------------------------------------------------------------------- memory
_PAGE = 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _trim() -> None:
    gc.collect(1)  # young generations: enough to drop the last step's graph; a full pass can take 0.5 s
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so the next step's growth is visible


def peak_memory(fn, device) -> tuple[int | None, str]:
    """Bytes of transient memory one call of ``fn`` needs above what is resident before it, and the method."""
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before, "cuda_max_memory_allocated"
    try:
        _trim()
        before = _rss()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        fn()
        return _hwm() - before, "vmhwm"
    except OSError:
        pass
    try:  # no VmHWM reset: sample the resident set every millisecond
        _trim()
        before, peak, stop = _rss(), [0], threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        fn()
        stop.set()
        t.join()
        return max(peak[0], _rss()) - before, "rss_sampling"
    except OSError:
        return None, "unavailable"


# ---------------------------------------------------------------------------------------------- the step
class TrainStep:
    """One Lightning-equivalent optimisation step on a fixed random batch (callable with the step index)."""

    def __init__(self, module, batch: int, device, dtype: str = "fp32", seed: int = 0):
        self.module = module.train()
        module.configure_model()  # where Lightning would compile (trainer.compile)
        self.opt = module.configure_optimizers()["optimizer"]
        g = torch.Generator().manual_seed(seed)
        n, vocab = module.num_positions, module.backbone.vocab_size
        self.codes = torch.randint(0, vocab, (batch, n), generator=g).to(device)
        self.labels = torch.randint(0, module.backbone.num_classes, (batch,), generator=g).to(device)
        self.device, self.dtype = torch.device(device), dtype
        self.clip = float(module.optim_cfg.grad_clip or 0.0)

    def __call__(self, step: int) -> None:
        m = self.module
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            g = m.generator(step)
            loss = m.loss_on(self.codes, m.drop_classes(self.labels, g), step, g)
        loss.backward()
        grads = [p.grad for p in m.backbone.parameters() if p.grad is not None]
        torch.nn.utils.get_total_norm(grads)  # what ARModule.on_before_optimizer_step logs
        if self.clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        tensors = list(self.module.parameters())
        tensors += [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w, time.process_time() - c


# ---------------------------------------------------------------------------------------------- benchmark
def bench_train(variants, sizes, *, flavour="llama", batch=8, repeat=3, warmup=1, device="cpu", dtype="fp32",
                grid=16, vocab=16384, compile=False, fused_adam=False, compile_backend="inductor",
                kernels=("auto",)) -> dict:
    """Per size: build every (variant, trainer.kernels), warm each up, then time them round-robin (interleaved, so
    a load change on a shared machine hits all of them alike); median of ``repeat``; then one step each for
    memory."""
    rows = []
    for size in sizes:
        steps = {}
        for v in variants:
            for kern in kernels:
                module = bench_module(v, size, flavour=flavour, grid=grid, vocab=vocab, compile=compile,
                                      fused_adam=fused_adam, device=device, compile_backend=compile_backend,
                                      kernels=kern)
                steps[v, kern] = TrainStep(module, batch, device, dtype)
        for step in steps.values():
            for i in range(warmup):
                step(i)
        times = {key: [] for key in steps}
        for r in range(repeat):
            for key, step in steps.items():
                times[key].append(timed(lambda: step(warmup + r), device))
        for (v, kern), step in steps.items():
            mem, how = peak_memory(lambda: step(warmup + repeat), device)
            flops = train_flops(step.module, step.codes, step.labels)
            wall = [t[0] for t in times[v, kern]]
            med = statistics.median(wall)
            rows.append({
                "variant": v, "size": size, "flavour": flavour, "dtype": dtype, "batch": batch,
                "tokens": batch * step.module.num_positions, "slots": flops["slots"],
                "params": sum(p.numel() for p in step.module.backbone.parameters()),
                "matmul_params": linear_weights(step.module.backbone),
                "step_s": round(med, 4), "step_s_min": round(min(wall), 4), "step_s_all": [round(x, 4) for x in wall],
                "cpu_s": round(statistics.median(t[1] for t in times[v, kern]), 4),
                "tokens_per_s": round(batch * step.module.num_positions / med, 1),
                "gflop_per_step": round(flops["total"] / 1e9, 3),
                "flops_forward": flops["forward"], "gflops": round(flops["total"] / med / 1e9, 2),
                "peak_mem_mb": None if mem is None else round(mem / 2 ** 20, 1), "memory_method": how,
                "state_mb": round(step.state_bytes() / 2 ** 20, 1), "compile": compile, "kernels": kern,
                "onednn_linears": step.module.onednn_linears, "fused_adam": fused_adam,
                "load": load_average()[:1],
            })
            print(f"bench train: {v} {size} {dtype} batch {batch} kernels {kern}: {med:.3f} s/step, "
                  f"{rows[-1]['tokens_per_s']:.0f} tokens/s, {rows[-1]['gflops']} GFLOP/s, "
                  f"peak +{rows[-1]['peak_mem_mb']} MB", flush=True)
        del steps
        gc.collect()
    kind = torch.device(device).type
    return {"results": rows, "memory_method": MEMORY_METHOD.get(kind, MEMORY_METHOD["cpu"]),
            "flop_method": FLOP_METHOD, "load_average": load_average()}
