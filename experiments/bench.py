"""Benchmark suite: training step, sampler, data loading — JSON results plus a Markdown summary beside them.

    python -m experiments.bench all --out runs/bench/all.json                     # defaults: a few minutes on 2 cores
    python -m experiments.bench train --size mid --variants raster,arpg --repeat 5 --out runs/bench/train.json
    python -m experiments.bench train --size mid --dtype bf16 --out runs/bench/train_bf16.json
    python -m experiments.bench sample --size small --batch 8 --out runs/bench/sample.json
    python -m experiments.bench train --device cuda --size B --batch 64 --out runs/bench/train_gpu.json

Every figure is a median of ``--repeat`` timed runs after ``--warmup`` untimed ones; the machine's matmul peak is
measured in the same process (before and after the timed sections, so drift under load shows) and MFU is the
model-FLOP rate over the best peak of the same dtype. The machine's load average is recorded beside each section:
on a shared machine, compare only figures taken at similar load (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch

# sync: the bench sections import it from here
from lightning_modules.flops import matmul_gflops, stream_gbps, sync  # noqa: F401
from lightning_modules.tf32 import cuda_tf32

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def runnable_variants(flavour: str) -> list[str]:
    """Every registered ordering that declares the backbone flavour (lightning_modules/variants.py)."""
    from lightning_modules.variants import capabilities, variant_names

    return [v for v in variant_names() if flavour in capabilities(v).flavours]


# ---------------------------------------------------------------------------------------------- machine
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "cpu family", "model", ...); {} where absent."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def machine_info(device) -> dict:
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "load_average": load_average(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            # OpenMP's default spin-wait turns 2 threads on 2 busy cores into 2-3x slower steps: record the policy
            "env": {k: os.environ.get(k, "") for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_sha"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_sha"] = ""
    return info


def matmul_peak(device="cpu", dtypes=("fp32", "bf16"), sizes=(1024, 2048, 4096), repeats: int = 3) -> dict:
    """Best GFLOP/s of one square matmul per dtype (lightning_modules/flops.py::matmul_gflops: ``gflops`` per wall
    second, ``gflops_per_cpu_s`` per CPU-second), the memory read bandwidth (flops.stream_gbps; the roofline's
    other side) and the load average they were measured at."""
    return {"matmul_peak": matmul_gflops(device, dtypes, sizes, repeats), "stream": stream_gbps(device),
            "load_average": load_average()}


# ---------------------------------------------------------------------------------------------- output
def _table(rows: list[dict], cols: list[str]) -> list[str]:
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return lines


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


TRAIN_COLS = ["variant", "size", "dtype", "batch", "slots", "compile", "kernels", "step_s", "step_s_min", "cpu_s",
              "tokens_per_s", "gflop_per_step", "gflops", "mfu", "mfu_cpu", "peak_mem_mb", "state_mb", "load"]
SAMPLE_COLS = ["variant", "size", "batch", "steps", "cfg", "draw", "precision", "compile", "kernels", "kv_cache",
               "seconds", "seconds_min", "cpu_s", "first_call_s", "images_per_s", "speedup_vs_raster", "speedup_cpu",
               "speedup_vs_eager", "speedup_vs_eager_cpu", "gflop", "gflops", "mfu", "mfu_cpu", "traffic_gb", "floor_s",
               "of_floor", "peak_mem_mb", "load"]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# roar benchmark ({results['command']})", "",
             f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
             f"torch {m['torch']}, device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, "
             f"env {m.get('env', {})}",
             f"- started {m['time']}, load average {m['load_average']}, git {m.get('git_sha', '')}, "
             f"section seconds {results.get('seconds', {})}",
             f"- command: `{results['argv']}`", ""]
    for key in ("peak_before", "peak_after"):
        if key in results:
            peaks = results[key]["matmul_peak"]
            text = ", ".join(f"{k} {v['gflops']} GFLOP/s {v['per_n']} ({v['gflops_per_cpu_s']} per CPU-s; by library "
                             f"{v.get('by_library', {})})"
                             for k, v in peaks.items())
            if "stream" in results[key]:
                text += f"; memory read {results[key]['stream']['gbps']} GB/s {results[key]['stream']['by_kernel']}"
            lines.append(f"- matmul peak ({key.split('_')[1]}, load {results[key]['load_average']}): {text}")
    if "gpu_tests" in results:
        g = results["gpu_tests"]
        lines += ["", "## GPU tests", "", f"`{g['command']}`: exit {g['rc']}, {g['summary']} ({g['seconds']} s; "
                  f"output: {g.get('log', '-')})", *(f"- {x}" for x in g.get("failed", []))]
    if results.get("skipped"):
        lines += ["", "skipped (time budget): " + "; ".join(results["skipped"])]
    if results.get("errors"):
        lines += ["", "## Units that failed (traceback on stderr)", "", *(f"- {x}" for x in results["errors"])]
    if "train" in results:
        t = results["train"]
        lines += ["", "## Training step", "", f"memory: {t['memory_method']}; FLOPs: {t['flop_method']}", ""]
        lines += _table(t["results"], TRAIN_COLS)
    if "sample" in results:
        s = results["sample"]
        lines += ["", "## Sampling", "", s["note"], ""]
        lines += _table(s["results"], SAMPLE_COLS)
        if s.get("targets"):
            lines += ["", "targets: " + "; ".join(f"{k}: {v}" for k, v in s["targets"].items())]
    if "data" in results:
        d = results["data"]
        lines += ["", "## Data loading", "", f"{d['pipeline']}, image {d['image_size']}, batch {d['batch_size']}", ""]
        lines += _table(d["results"], ["workers", "images_per_s", "first_batch_s", "seconds", "skipped"])
    return "\n".join(lines) + "\n"


def write_results(results: dict, path: str) -> tuple[str, str]:
    """FILE.json and FILE.md (the summary) side by side; returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(results))
    return path, md


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="roar benchmarks: training step, sampler, data loading.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("train", "sample", "data", "all"))
    p.add_argument("--size", default=None, help="comma-separated: debug,small,mid,B,L (train default: small,mid; "
                                                "sample default: small)")
    p.add_argument("--variants", default="", help="comma-separated (default: every ordering the flavour runs)")
    p.add_argument("--flavour", default="llama", choices=("llama", "rar_vit"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="train: bf16 = autocast (bf16-mixed)")
    p.add_argument("--batch", default="", help="sample: comma-separated batch sizes (default 1,8); train: the "
                                                "first of them (default 8)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--grid", type=int, default=16, help="code grid side (16 = 256 tokens, the ImageNet-256 setting)")
    p.add_argument("--vocab", type=int, default=16384, help="codebook size (LlamaGen VQ: 16384)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="train: torch.compile the backbone (trainer.compile)")
    p.add_argument("--fused-adam", action="store_true", help="train: AdamW(fused=True)")
    p.add_argument("--steps", default="", help="sample: comma-separated step sweep (default: 16,32,64,128,256 of "
                                                "256, scaled; `all` runs the headline counts only unless given)")
    p.add_argument("--no-sweep", action="store_true", help="sample: only the headline step counts")
    p.add_argument("--draws", default="multinomial,inverse_cdf", help="sample: sample.draw values to time")
    p.add_argument("--precisions", default="fp32", help="sample: sample.precision values to time (fp32,bf16)")
    p.add_argument("--sample-compile", default="off", help="sample: sample.compile values to time (off,on,static; "
                                                             "speedup_vs_eager compares each with off)")
    p.add_argument("--kernels", default="auto", help="train: trainer.kernels, sample: sample.kernels values to time "
                                                      "(aten,onednn,auto; speedup_vs_eager compares each sampling row "
                                                      "with compile off + aten)")
    p.add_argument("--tf32", default="on", choices=("on", "off"),
                   help="CUDA fp32 matmuls in TF32 (trainer.tf32 / sample.tf32: on, as a run trains and samples)")
    p.add_argument("--cfgs", default="", help="sample: CFG scales to time (default 1,4)")
    p.add_argument("--nocache", default="default", help="sample: no-KV-cache reference at 'default' steps, 'all', "
                                                         "or 'off'")
    p.add_argument("--peak-sizes", default="1024,2048,4096")
    p.add_argument("--data-batches", type=int, default=10)
    p.add_argument("--data-workers", default="0,1,2", help="data: comma-separated DataLoader worker counts")
    p.add_argument("--data-batch-size", type=int, default=32)
    p.add_argument("--data-shards", default=None, help="data: shard pattern (default: synthetic 256x256 JPEG shards)")
    p.add_argument("--suite", default="default", choices=("default", "gpu"),
                   help="gpu: the GPU suite of experiments/bench_gpu.py (`make bench-gpu`; needs `all`)")
    p.add_argument("--dry-run", action="store_true", help="--suite gpu: the same code on the CPU at toy sizes")
    p.add_argument("--budget-s", type=float, default=0.0, help="--suite gpu: seconds the suite may take (0 = 540, "
                                                                "unlimited with --dry-run)")
    p.add_argument("--out", required=True, help="FILE.json (FILE.md is written beside it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.suite == "gpu":
        import sys

        from experiments.bench_gpu import preflight

        missing = preflight()
        if missing:  # the GPU image lacks some of roar's packages: say which, in one line
            print(missing, file=sys.stderr)
            return 2
        if a.what != "all":
            print("bench: --suite gpu runs `all`", file=sys.stderr)
            return 2
        if a.dry_run:
            a.device = "cpu"
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        with cuda_tf32(a.tf32 == "on"):  # the peaks too: an MFU's peak must be the one its matmuls run at
            return run(a, argv)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)


def run(a, argv) -> int:
    import sys

    torch.manual_seed(0)
    results = {"command": a.what, "argv": " ".join(["python -m experiments.bench"] + list(argv or sys.argv[1:])),
               "machine": machine_info(a.device), "tf32": a.tf32}
    variants = [v for v in a.variants.split(",") if v] or runnable_variants(a.flavour)
    peak_sizes = tuple(int(n) for n in a.peak_sizes.split(","))
    dtypes = peak_dtypes(a)
    seconds = results["seconds"] = {}
    if a.suite == "gpu":
        from experiments.bench_gpu import run_suite

        # after every unit (a run killed at the lease's limit keeps what it finished) and once at the end
        def save(partial) -> tuple[str, str]:
            add_mfu(partial)
            return write_results(partial, a.out)

        json_path, md_path = save(run_suite(a, results, save))
        print(markdown(results))
        print(f"bench: wrote {json_path} and {md_path}")
        return 1 if results["errors"] or results["gpu_tests"].get("rc") != 0 else 0  # the figures are written anyway
    if a.what in ("train", "all"):
        from experiments.bench_train import bench_train

        t = time.perf_counter()
        results["peak_before"] = matmul_peak(a.device, dtypes, peak_sizes)
        sizes = (a.size or "small,mid").split(",")
        batch = int((a.batch or "8").split(",")[0])
        results["train"] = bench_train(variants, sizes, flavour=a.flavour, batch=batch, repeat=a.repeat,
                                       warmup=a.warmup, device=a.device, dtype=a.dtype, grid=a.grid, vocab=a.vocab,
                                       compile=a.compile, fused_adam=a.fused_adam, kernels=a.kernels.split(","))
        results["peak_after"] = matmul_peak(a.device, dtypes, peak_sizes)
        add_mfu(results)
        seconds["train"] = round(time.perf_counter() - t, 1)
    if a.what in ("sample", "all"):
        from experiments.bench_sample import bench_sample

        t = time.perf_counter()
        sizes = (a.size or "small").split(",")
        steps = [int(s) for s in a.steps.split(",") if s]
        batches = [int(b) for b in (a.batch or "1,8").split(",")]
        # `all` keeps to the headline step counts (a few minutes); `sample` adds the sweep unless --no-sweep
        no_sweep = a.no_sweep or (a.what == "all" and not steps)
        if "peak_before" not in results:  # sampling MFU needs the peak too
            results["peak_before"] = matmul_peak(a.device, dtypes, peak_sizes)
        results["sample"] = bench_sample(variants, sizes, flavour=a.flavour, batches=batches, repeat=a.repeat,
                                         warmup=a.warmup, device=a.device, grid=a.grid, vocab=a.vocab, sweep=steps,
                                         no_sweep=no_sweep, nocache=a.nocache, draws=a.draws.split(","),
                                         precisions=a.precisions.split(","), compiles=a.sample_compile.split(","),
                                         kernels=a.kernels.split(","), tf32=a.tf32 == "on",
                                         cfgs=[float(c) for c in a.cfgs.split(",")] if a.cfgs else None)
        results["peak_after"] = matmul_peak(a.device, dtypes, peak_sizes)
        add_mfu(results)
        seconds["sample"] = round(time.perf_counter() - t, 1)
    if a.what in ("data", "all"):
        from experiments.bench_data import bench_data

        t = time.perf_counter()
        results["data"] = bench_data(a.data_shards, batches=a.data_batches, batch_size=a.data_batch_size,
                                     workers=tuple(int(w) for w in a.data_workers.split(",")))
        results["data"]["load_average"] = load_average()
        seconds["data"] = round(time.perf_counter() - t, 1)
    json_path, md_path = write_results(results, a.out)
    print(markdown(results))
    print(f"bench: wrote {json_path} and {md_path}")
    return 0


def peak_dtypes(a) -> tuple[str, ...]:
    """The matmul peaks a run needs: those of the dtypes it times. A CPU without native bf16 (AVX2 only) multiplies
    bf16 at a crawl, so measuring a bf16 peak nobody reads stalled an fp32 bench for minutes at n = 4096."""
    needed = set()
    if a.what in ("train", "all"):
        needed.add(a.dtype)
    if a.what in ("sample", "all"):
        needed.update(a.precisions.split(","))
    return tuple(d for d in DTYPES if d in needed) or ("fp32",)


def add_mfu(results: dict) -> None:
    """mfu = achieved model FLOP/s / the best matmul peak of the step's dtype seen in this process (before or after
    the timed section). mfu_cpu (CPU runs) = model FLOPs per CPU-second of the step / matmul FLOPs per CPU-second:
    robust to other processes sharing the cores; close to mfu on an idle machine."""
    rows = [(r, r["dtype"], r.get("gflop_per_step")) for r in results.get("train", {}).get("results", [])]
    sample = results.get("sample", {}).get("results", [])
    rows += [(r, r.get("precision", "fp32"), r.get("gflop")) for r in sample]  # sampling: at its precision
    bandwidth = max((results[k]["stream"]["gbps"] for k in ("peak_before", "peak_after")
                     if "stream" in results.get(k, {})), default=0.0)
    for row, dtype, gflop in rows:
        peaks = [results[k]["matmul_peak"][dtype] for k in ("peak_before", "peak_after")
                 if k in results and dtype in results[k]["matmul_peak"]]
        if not peaks or not row.get("gflops"):
            continue
        row["peak_gflops"] = max(p["gflops"] for p in peaks)
        row["mfu"] = round(row["gflops"] / row["peak_gflops"], 3)
        if results["machine"]["device"] == "cpu" and row.get("cpu_s") and gflop:
            row["mfu_cpu"] = round(gflop / row["cpu_s"] / max(p["gflops_per_cpu_s"] for p in peaks), 3)
        if row.get("traffic_gb") and bandwidth:  # roofline: the generation can be no faster than its FLOPs at the
            # matmul peak, nor than its unavoidable reads at the read bandwidth (a whole-generation lower bound)
            row["floor_s"] = round(max(gflop / row["peak_gflops"], row["traffic_gb"] / bandwidth), 4)
            row["of_floor"] = round(row["floor_s"] / row["seconds"], 3)
    for r in sample:  # the sampling MFU target: batch 8 at >= 0.7 of the matmul peak
        if r.get("batch") == 8 and "mfu" in r:
            key = (f"{r['variant']} {r['steps']} steps, {r['size']}, batch 8, cfg {r['cfg']:g}, {r['draw']}, "
                   f"{r.get('precision', 'fp32')}, compile {r.get('compile', 'off')}, "
                   f"kernels {r.get('kernels', 'aten')} MFU")
            met = "met" if r["mfu"] >= 0.7 else "NOT met"
            results["sample"].setdefault("targets", {})[key] = (f"{r['mfu']} (target 0.7: {met}; CPU-time MFU "
                                                                f"{r.get('mfu_cpu', '-')}; at {r.get('of_floor', '-')} "
                                                                f"of the roofline floor {r.get('floor_s', '-')} s)")


if __name__ == "__main__":
    raise SystemExit(main())
