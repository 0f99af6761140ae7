"""The GPU suite (`make bench-gpu`): everything a lent GPU should measure, inside one time budget (< 10 minutes).

    python -m experiments.bench all --device cuda --suite gpu --out runs/bench/gpu.json
    python -m experiments.bench all --suite gpu --dry-run --out runs/bench/gpu_dry.json     # any CPU machine

Each unit starts only while the budget (``--budget-s``, default 540 s; unlimited in a dry run) is expected to hold
it (the longest unit of its kind so far), the rest are listed under ``skipped``; every ordering gets one kind of
figure before any gets the next, the speed claims first: batch-1 sampling at L of the claims' orderings (raster,
ARPG, RandAR: bench_sample.SPEED_TARGETS), then batch-1 sampling at B, training at B, batch-64 sampling, the other
orderings' batch-1 sampling at L, training at L:
  1. the GPU tests (`pytest -m gpu`, tests/test_gpu.py), their summary line, exit status and FAILED lines, the
     whole output in FILE_tests.log beside the JSON;
  2. sampling images/s per ordering at the papers' step counts (``Ordering.headline_steps``), batch 1 (size B and
     L: ARPG 32 steps against raster 256 at L is the speed claim to check) and 64 (size B),
     CFG 4, bf16 weights (the official samplers' precision), the fast decode path (sample.compile=on: CUDA graphs)
     and, at batch 1, the eager loop it is measured against (speedup_vs_eager), torch's kernels
     (sample.kernels=aten: what auto means on a GPU), with model FLOPs, MFU and peak memory;
  3. the training step per ordering at size B, bf16-mixed (autocast), flash SDPA where the mask allows, the
     backbone under torch.compile (trainer.compile), with MFU and peak memory; 4. the same at size L.
A unit that fails (an out-of-memory, a CUDA error) is listed under ``errors`` with its traceback on stderr, and the
suite goes on; the results file is rewritten after the GPU tests and after every unit, so a run killed at the lease's
limit keeps every figure it finished (the device command writes it straight into $OUT). Each unit ends with one
line on stderr (what, how long, seconds left).
``--dry-run`` runs the same code on the CPU at toy sizes (debug model, 4x4 grid, batch 1 and 2, one repeat), with
torch.compile's dynamo capture but the "eager" backend (no code generation: minutes saved, same graph capture).
The GPU image carries its own torch and may lack some of roar's packages: ``preflight`` names the first missing
one in one line before anything runs.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import traceback

# import name -> pip name, for the one-line message about a missing package
PIP_NAMES = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "torch_fidelity": "torch-fidelity"}
NOTE = ("GPU suite: headline steps, CFG 4, bf16 weights, sample.compile=on (fast decode path; CUDA graphs on a GPU) "
        "and, at batch 1, off (the eager loop: speedup_vs_eager), torch's kernels, multinomial draw; gflop = model "
        "FLOPs of one generation; peak_mem_mb = peak memory of one generate call")
SUITE_MODULES = ("pytest", "experiments.build", "experiments.bench_train", "experiments.bench_sample",
                 "experiments.bench_data", "lightning_modules.fast_decode")


def preflight(modules=SUITE_MODULES) -> str | None:
    """None when every module the suite runs imports; else one line naming the missing package."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            top = (err.name or "?").split(".")[0]
            pip = PIP_NAMES.get(top, top)
            return (f"bench-gpu: package {pip!r} is missing (importing {name} needs `{top}`): "
                    f"pip install {pip}")
    return None


class Budget:
    """Seconds left for the suite, and a per-kind estimate of a unit's length (the longest seen so far)."""

    def __init__(self, seconds: float):
        self.start, self.seconds, self.longest = time.perf_counter(), seconds, {}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, kind: str, default: float) -> bool:
        return self.left() >= self.longest.get(kind, default)

    def says(self) -> str:
        return f"{self.left():.0f} s left" if self.left() != float("inf") else "no budget"

    def record(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)


def gpu_tests(timeout: float, dry_run: bool, log_path: str) -> dict:
    """`pytest -m gpu` in a subprocess (on a CPU machine every test skips: the same invocation, nothing to run). Its
    whole output goes to ``log_path`` (a failure's traceback is the one thing a one-off GPU lease must bring back);
    the result keeps the summary line and pytest's FAILED / ERROR lines."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=max(timeout, 1))
        text, rc = p.stdout + p.stderr, p.returncode
        lines = [x for x in p.stdout.strip().splitlines() if x.strip()]
        summary = lines[-1] if lines else p.stderr.strip()[-300:]
    except subprocess.TimeoutExpired as err:  # what it printed so far still names the tests that finished
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (err.stdout,
                                                                                                  err.stderr))
        rc, summary = None, f"timed out after {timeout:.0f} s"
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "w") as f:
        f.write(text)
    failed = [x for x in text.splitlines() if x.startswith(("FAILED ", "ERROR "))]
    return {"rc": rc, "summary": summary, "failed": failed, "log": log_path, "command": " ".join(cmd[2:]),
            "seconds": round(time.perf_counter() - t, 1), "dry_run": dry_run}


def run_suite(a, results: dict, save=None) -> dict:
    """Fill ``results`` (train / sample / gpu_tests / skipped / errors); ``a`` is bench.parse_args' namespace.
    ``save(results)`` (if given) runs after the GPU tests and after every unit."""
    import torch

    import lightning_modules.fast_decode as fast_decode
    from experiments.bench import matmul_peak, runnable_variants
    from experiments.bench_sample import BASELINE, SPEED_TARGETS, add_speedups, bench_sample, targets
    from experiments.bench_train import bench_train
    from experiments.cli import say

    dry = a.dry_run
    budget = Budget(a.budget_s if a.budget_s else (float("inf") if dry else 540.0))  # a dry run skips nothing
    device = "cpu" if dry else a.device
    variants = [v for v in a.variants.split(",") if v] or runnable_variants(a.flavour)
    claimed = [BASELINE] + [v for v, _, _ in SPEED_TARGETS]  # the claims' orderings first: a short budget keeps them
    variants = [v for v in claimed if v in variants] + [v for v in variants if v not in claimed]
    sizes = ["debug"] if dry else ["B", "L"]
    batches = [1, 2] if dry else [1, 64]
    grid, vocab = (4, 32) if dry else (a.grid, a.vocab)
    repeat, warmup = (1, 1) if dry else (a.repeat, a.warmup)
    peak_sizes = (64,) if dry else (1024, 2048, 4096, 8192)
    results["suite"] = {"name": "gpu", "dry_run": dry, "budget_s": a.budget_s,
                        "flash_sdp_enabled": bool(torch.backends.cuda.flash_sdp_enabled())}
    results["skipped"], results["errors"] = [], []
    results["peak_before"] = matmul_peak(device, ("fp32", "bf16"), peak_sizes)
    log = os.path.splitext(a.out)[0] + "_tests.log"
    results["gpu_tests"] = gpu_tests(min(300.0, budget.left() / 2), dry, log)  # the checks first, then figures
    say(f"bench-gpu: GPU tests: {results['gpu_tests'].get('summary', '')} ({budget.says()})")
    if save:
        save(results)
    backend, fast_decode.BACKEND = fast_decode.BACKEND, "eager" if dry else fast_decode.BACKEND
    sample_rows, train_rows = [], []

    def sample(v, batch, size):
        s = bench_sample([v], [size], flavour=a.flavour, batches=[batch], repeat=repeat, warmup=warmup,
                         device=device, grid=grid, vocab=vocab, no_sweep=True, nocache="off", draws=["multinomial"],
                         precisions=["bf16"], compiles=["off", "on"] if batch == batches[0] else ["on"],
                         kernels=["aten"], cfgs=[4.0], memory=True, tf32=a.tf32 == "on")
        sample_rows.extend(s["results"])

    def train(v, size):
        r = bench_train([v], [size], flavour=a.flavour, batch=batches[-1], repeat=repeat, warmup=max(warmup, 1),
                        device=device, dtype="bf16", grid=grid, vocab=vocab, compile=True,
                        compile_backend="eager" if dry else "inductor")
        train_rows.extend(r["results"])
        results["train"] = {**r, "results": train_rows}

    # the speed claims first: batch-1 sampling at L (the papers' size) of their orderings; then every ordering gets
    # each kind of figure before any gets the next: batch-1 sampling at B, training at B, batch-64 sampling, the
    # other orderings' batch-1 sampling at L, training at L. A compiled step's first call compiles (minutes for
    # six orderings), so a unit starts only while the budget holds the longest of its kind so far
    big = sizes[-1] if len(sizes) > 1 else None
    first = [v for v in variants if v in claimed] if big else []
    sample_big = lambda vs: [(f"sample {big} batch {batches[0]}", 45.0, sample, (v, batches[0], big))  # noqa: E731
                             for v in vs]
    units = sample_big(first)
    units += [(f"sample {sizes[0]} batch {batches[0]}", 30.0, sample, (v, batches[0], sizes[0])) for v in variants]
    units += [(f"train {sizes[0]}", 60.0, train, (v, sizes[0])) for v in variants]
    units += [(f"sample {sizes[0]} batch {batches[1]}", 30.0, sample, (v, batches[1], sizes[0])) for v in variants]
    units += sample_big([v for v in variants if v not in first]) if big else []
    units += [(f"train {big}", 90.0, train, (v, big)) for v in variants] if big else []

    def summarise():
        add_speedups(sample_rows, grid * grid)
        results["sample"] = {"results": sample_rows, "targets": targets(sample_rows, grid * grid), "note": NOTE}

    try:
        for kind, default, fn, args in units:
            if not budget.allows(kind, default):
                results["skipped"].append(f"{kind} {args[0]} (budget)")
                continue
            t, outcome = time.perf_counter(), "done"
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001 -- one unit's OOM or CUDA error must not cost the other figures
                traceback.print_exc()
                detail = (str(err).strip().splitlines() or [""])[0][:300]
                results["errors"].append(f"{kind} {args[0]}: {type(err).__name__}: {detail}")
                outcome = "FAILED"
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()  # what the failed unit held, for the next one
            seconds = time.perf_counter() - t
            budget.record(kind, seconds)
            say(f"bench-gpu: {kind} {args[0]}: {outcome} in {seconds:.0f} s ({budget.says()})")
            summarise()
            if save:
                save(results)
    finally:
        fast_decode.BACKEND = backend
    summarise()
    results["peak_after"] = matmul_peak(device, ("fp32", "bf16"), peak_sizes)
    results["suite"]["seconds"] = round(time.perf_counter() - budget.start, 1)
    return results
