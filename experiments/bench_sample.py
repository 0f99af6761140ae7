"""Sampling benchmark: images/s per ordering vs decode steps, with and without the KV cache, CFG on and off.

    python -m experiments.bench sample --size small --batch 8 --out runs/bench/sample.json

Headline settings (N = grid positions; the paper numbers are for N = 256): raster and RAR decode N steps; RandAR
88 of 256 steps scaled to N; ARPG 64 and 32 of 256 scaled; RandAR and ARPG also over a sweep of step counts.
Every setting runs with CFG off (scale 1: the batch stays single) and on (scale 4: [cond; null] doubled batch).

Without KV cache is a benchmark-only reference, ``NoCacheBackbone``: the same loop
(lightning_modules.sampling.generate) and the same decode plans and steps, but each step re-runs the backbone over
the whole live prefix with no cache. Attention is restricted by a mask that emulates what the static cache shows
at that step: keys written at earlier or the same step, the latest write of a row wins (RandAR overwrites),
rows past the step's highest row are invisible, and the step's own explicit mask applies. Slots no live slot can
see (RandAR's overwritten queries) are pruned. Its tokens equal the cached sampler's for the same seed
(tests/test_bench.py), a real check of the cache.
"""
from __future__ import annotations

import statistics
import time

import torch

from experiments.bench import load_average, sync
from lightning_modules.base import make_generator
from lightning_modules.nn.sequence import Seq
from lightning_modules.sampling import generate


# ---------------------------------------------------------------------------------------------- no-cache reference
class History:
    """Stands in for the KV cache: every decode step's Seq so far."""

    def __init__(self):
        self.steps: list[Seq] = []


def _step_visibility(seq: Seq, rows: torch.Tensor) -> torch.Tensor:
    """bool [Bm, L_s, T]: which of the T keys (by cache row) the L_s slots of one step may attend to."""
    if seq.mask is None:  # causal over rows
        return (rows[None, :] <= seq.rows[:, None])[None]
    m = seq.mask[:, 0]  # [Bm, L_s, Lk_s]; Lk_s = the step's max row + 1 (the cache's visible length)
    inside = rows < m.shape[-1]
    return m[:, :, rows.clamp(max=m.shape[-1] - 1)] & inside[None, None]


def emulated_seq(history: History) -> Seq:
    """One cache-less Seq for the current (last) step: every live slot so far, masked as the cache would see it."""
    seqs = history.steps
    cur = len(seqs) - 1
    dev = seqs[-1].rows.device
    rows = torch.cat([s.rows for s in seqs])  # [T] cache row of every slot ever written
    step = torch.cat([torch.full_like(s.rows, i) for i, s in enumerate(seqs)])
    T = rows.shape[0]
    # the step at which a slot's row is next written (overwritten); slots are alive for steps before it
    later = (rows[None, :] == rows[:, None]) & (step[None, :] > step[:, None])  # [T(slot), T(writer)]
    big = torch.full((T, T), len(seqs), dtype=torch.long, device=dev)
    overwritten = torch.where(later, step[None, :].expand(T, T), big).min(1).values  # [T]
    seen = (step[None, :] <= step[:, None]) & (step[:, None] < overwritten[None, :])  # [T(query), T(key)]
    Bm = max([s.mask.shape[0] for s in seqs if s.mask is not None], default=1)
    cond = torch.cat([_step_visibility(s, rows).expand(Bm, -1, -1) for s in seqs], 1)  # [Bm, T(query), T(key)]
    vis = cond & seen[None]  # [Bm, T, T]
    # prune: keep the current step's slots and, transitively, every slot a kept slot (or query) attends to
    keep = step == cur
    qvis = None
    if seqs[-1].query_pos is not None:  # ARPG queries read the shared K/V of the content slots alive now
        length = int(seqs[-1].rows.max()) + 1
        alive = (step <= cur) & (cur < overwritten) & (rows < length)  # [T]
        qvis = alive[None, None, :].expand(1, seqs[-1].query_pos.shape[1], T)
        if seqs[-1].query_mask is not None:
            qm = seqs[-1].query_mask[:, 0]
            qvis = qvis & qm[:, :, rows.clamp(max=qm.shape[-1] - 1)] & (rows < qm.shape[-1])
        keep = keep | qvis.any(0).any(0)
    while True:
        grown = keep | vis[:, keep].any(0).any(0)
        if torch.equal(grown, keep):
            break
        keep = grown
    idx = torch.nonzero(keep).squeeze(1)
    idx = idx[torch.argsort(rows[idx] * (cur + 1) + step[idx], stable=True)]  # cache row order (keys' order)
    vis = vis[:, idx][:, :, idx]
    r = rows[idx]
    causal = (r[None, :] <= r[:, None])[None]
    mask = None if torch.equal(vis, causal.expand_as(vis)) else vis[:, None]  # rar_vit accepts causal only
    cat = lambda name: torch.cat([getattr(s, name) for s in seqs], 1)[:, idx]  # noqa: E731
    offset = sum(s.rows.shape[0] for s in seqs[:-1])
    last = seqs[-1]
    if last.query_pos is None:  # outputs at the current step's slots, now at new indices
        local = torch.arange(last.rows.shape[0], device=dev) if last.out is None else last.out
        assert local.dim() == 1, "decode steps name their output slots per batch ([M])"
        where = torch.full((T,), -1, dtype=torch.long, device=dev)
        where[idx] = torch.arange(idx.shape[0], device=dev)
        out = where[offset + local]
    else:
        out = last.out
    targets = None if any(s.target is None for s in seqs) else cat("target")
    return Seq(kind=cat("kind"), ids=cat("ids"), pos=cat("pos"), labels=last.labels,
               rows=r, target=targets, mask=mask, query_pos=last.query_pos,
               query_mask=None if qvis is None else qvis[:, None][:, :, :, idx], out=out)


class NoCacheBackbone:
    """Wraps a backbone: ``new_cache`` gives a History and each call recomputes the live prefix without a cache."""

    def __init__(self, backbone):
        self.backbone = backbone

    def __getattr__(self, name):  # num_positions, num_classes, parameters(), ...
        return getattr(self.backbone, name)

    def new_cache(self, batch, max_len, device=None, dtype=None) -> History:
        return History()

    def __call__(self, seq: Seq, history: History) -> torch.Tensor:
        # a private copy: the sampling loop owns the tensors it hands in
        history.steps.append(Seq(**{k: v.clone() if torch.is_tensor(v) else v for k, v in vars(seq).items()}))
        return self.backbone(emulated_seq(history), None)


class NoCacheModule:
    """The module as the sampling loop sees it, with the backbone swapped for the cache-less reference (around the
    sampling copy of ``kernels``: generate's own sampling_backbone then finds nothing left to pack)."""

    def __init__(self, module, kernels: str = "aten"):
        from lightning_modules.sampling import sampling_backbone

        self.module = module
        self.backbone = NoCacheBackbone(sampling_backbone(module.backbone, "fp32", kernels))

    def __getattr__(self, name):
        return getattr(self.module, name)


@torch.no_grad()
def sample_nocache(module, labels, settings, generator=None, **kwargs) -> torch.Tensor:
    """``generate`` without a KV cache (benchmark reference): codes long [B, N] in raster order."""
    return generate(NoCacheModule(module, settings.kernels), labels, settings, generator, **kwargs)


# ---------------------------------------------------------------------------------------------- FLOPs
def generation_flops(module, batch: int, settings, seed: int = 0) -> dict:
    """Model FLOPs of one cached ``generate`` call, counted from its decode plan like the training FLOPs: per step
    the matmuls over the slots fed and the queries asked, the attention over the visible cache length (the step's
    whole-cache mask from the fast path's plan, attention.StaticPrep), the head at the output slots (bench_train.
    forward_flops). CFG's doubled batch is counted: it is computed. Draws, norms and embeddings are not counted.

    ``bytes``: the memory a generation cannot avoid reading, for the roofline floor (bench.add_mfu): per step every
    linear weight once (at the sampling precision) and the K/V rows the step attends to (visible cache length x
    batch x layers x 2 x dim); activations and the draw's [rows, V] tensors are not counted."""
    from experiments.bench_train import forward_flops
    from lightning_modules.fast_decode import plan_steps
    from lightning_modules.flops import linear_weights
    from lightning_modules.sampling import PRECISIONS, start_state, step_scales

    ordering, backbone, device = module.ordering, module.backbone, module.device
    N = backbone.num_positions
    plan = ordering.decode_plan(batch, settings.num_steps, settings.schedule, make_generator(seed, device),
                                device=device)
    scales = step_scales(ordering, plan, settings, N)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    state = start_state(plan, labels, any(s != 1.0 for s in scales), backbone.num_classes, N, settings.mode)
    cache = backbone.new_cache(1, ordering.cache_length(N), device=device)  # only its length is read
    width = PRECISIONS[settings.precision].itemsize
    weights = linear_weights(backbone) * width
    layers = len(getattr(backbone, "blocks", None) or backbone.layers) + len(getattr(backbone, "cross", None) or [])
    prefix = 1 if hasattr(backbone, "blocks") else 0  # rar_vit's cls slot holds a cache row of its own
    out = {"body": 0, "attention": 0, "head": 0, "total": 0, "bytes": 0}
    for step in plan_steps(ordering, backbone, plan, state, scales, cache):
        for k, v in forward_flops(backbone, step.seq, step.prep).items():
            out[k] += v
        keys = int(step.seq.rows.max()) + 1 + prefix
        out["bytes"] += weights + state.tokens.shape[0] * keys * layers * 2 * backbone.dim * width
    return out


# ---------------------------------------------------------------------------------------------- benchmark
def scaled(steps_of_256: int, n: int) -> int:
    return max(1, round(steps_of_256 * n / 256))


def step_plan(variant: str, n: int, sweep: list[int], no_sweep: bool) -> list[tuple[int, bool]]:
    """(num_steps, headline?) per variant: the paper settings, then the sweep (multi-token orderings only)."""
    import math

    from lightning_modules.variants import build_ordering

    side = math.isqrt(n)
    ordering = build_ordering(variant, (side, n // side))
    heads = ordering.headline_steps(n)
    if not ordering.capabilities.parallel:
        return [(s, True) for s in heads]  # one token per step by construction
    extra = [] if no_sweep else [s for s in (sweep or [scaled(k, n) for k in (16, 32, 64, 128, 256)])
                                 if s not in heads and 1 <= s <= n]
    return [(s, True) for s in heads] + [(s, False) for s in sorted(set(extra))]


def bench_sample(variants, sizes, *, flavour="llama", batches=(1, 8), repeat=3, warmup=1, device="cpu", grid=16,
                 vocab=16384, sweep=(), no_sweep=False, nocache="default", draws=("multinomial", "inverse_cdf"),
                 precisions=("fp32",), compiles=("off",), kernels=("auto",), cfgs=None, cfg_scale=4.0, seed=0,
                 memory: bool = False, tf32: bool = True) -> dict:
    """Per size: round-robin over every (variant, batch, steps, cfg, draw, precision, compile, kernels, cache)
    setting, so a
    load change on a shared machine hits all alike; median seconds of ``repeat`` after ``warmup`` (at least one
    warm-up call where a compiled step is timed: it compiles; its seconds are ``first_call_s``). The no-cache
    reference runs at the headline steps with CFG off and the first draw ("default"), everywhere ("all"), or never
    ("off"). Every row carries the generation's model FLOPs (``generation_flops``) and its GFLOP/s."""
    from experiments.bench_train import bench_module

    rows, n = [], grid * grid
    for size in sizes:
        modules = {v: bench_module(v, size, flavour=flavour, grid=grid, vocab=vocab, device=device).eval()
                   for v in variants}
        runs = []
        for v in variants:
            for batch in batches:
                for steps, head in step_plan(v, n, list(sweep), no_sweep):
                    for cfg in (cfgs or (1.0, cfg_scale)):
                        for draw in draws:
                            for precision in precisions:
                                for comp in compiles:
                                    for kern in kernels:
                                        runs.append((v, batch, steps, cfg, draw, precision, comp, kern, True))
                        if nocache == "all" or (nocache == "default" and head and cfg == 1.0):
                            runs.append((v, batch, steps, cfg, draws[0], "fp32", "off", kernels[0], False))  # ref.

        def settings(v, batch, steps, cfg, draw, precision, comp, kern):
            return modules[v].sample_settings(num_steps=steps, cfg_scale=cfg, draw=draw, precision=precision,
                                              compile=comp, kernels=kern, tf32=tf32)

        def run(v, batch, steps, cfg, draw, precision, comp, kern, cache):
            m = modules[v]
            labels = torch.arange(batch, device=device) % m.backbone.num_classes
            s = settings(v, batch, steps, cfg, draw, precision, comp, kern)
            (generate if cache else sample_nocache)(m, labels, s, make_generator(seed, device))

        first = {}
        for r in runs:
            for i in range(max(warmup, 1 if r[6] in ("on", "auto") else 0)):
                sync(device)
                t = time.perf_counter()
                run(*r)
                sync(device)
                first.setdefault(r, time.perf_counter() - t)
        flops, traffic = {}, {}
        for r in runs:
            if r[:6] not in flops:
                counts = generation_flops(modules[r[0]], r[1], settings(*r[:8]), seed)
                flops[r[:6]], traffic[r[:6]] = counts["total"], counts["bytes"]
        times = {r: [] for r in runs}
        for _ in range(repeat):
            for r in runs:
                sync(device)
                t, c = time.perf_counter(), time.process_time()
                run(*r)
                sync(device)
                times[r].append((time.perf_counter() - t, time.process_time() - c))
        mem = {}
        if memory:  # the peak memory of one generate call (CUDA: max_memory_allocated; CPU: resident set)
            from experiments.bench_train import peak_memory

            for r in runs:
                mem[r] = peak_memory(lambda: run(*r), device)[0]
        for r, tc in times.items():
            v, batch, steps, cfg, draw, precision, comp, kern, cache = r
            ts = [t for t, _ in tc]
            med = statistics.median(ts)
            row = {"variant": v, "size": size, "flavour": flavour, "batch": batch, "steps": steps, "cfg": cfg,
                   "draw": draw, "precision": precision, "compile": comp, "kernels": kern, "kv_cache": cache,
                   "seconds": round(med, 4),
                   "seconds_min": round(min(ts), 4), "seconds_all": [round(t, 4) for t in ts],
                   "cpu_s": round(statistics.median(c for _, c in tc), 4), "images_per_s": round(batch / med, 3),
                   "load": load_average()[:1]}
            if r in first:
                row["first_call_s"] = round(first[r], 3)
            if mem.get(r) is not None:
                row["peak_mem_mb"] = round(mem[r] / 2 ** 20, 1)
            if cache:  # the no-cache reference recomputes the prefix: its FLOPs are not the generation's
                row["gflop"] = round(flops[r[:6]] / 1e9, 4)
                row["gflops"] = round(flops[r[:6]] / med / 1e9, 3)
                row["traffic_gb"] = round(traffic[r[:6]] / 1e9, 4)
            rows.append(row)
            print(f"bench sample: {v} {size} batch {batch} steps {steps} cfg {cfg:g} {draw} {precision} compile {comp} "
                  f"kernels {kern} cache {cache}: {med:.3f} s, {batch / med:.2f} images/s", flush=True)
        del modules
    add_speedups(rows, n)
    return {"results": rows, "targets": targets(rows, n), "load_average": load_average(),
            "note": f"images/s = batch / median seconds of one `generate` call; CFG on = scale {cfg_scale:g} "
                    "(doubled batch); kv_cache False = the no-cache reference (recompute the live prefix each "
                    "step); precision = sample.precision (bf16: a bf16 copy of the weights, as the official "
                    "samplers); "
                    "draw = sample.draw (multinomial: torch.multinomial, the reference stream; inverse_cdf: "
                    "one uniform per token); compile = sample.compile (off: the eager loop; on: the compiled "
                    "static step; static: the static step uncompiled); kernels = sample.kernels (aten: torch's "
                    "linears; onednn: every linear prepacked for oneDNN; auto: the big ones on a CPU); "
                    "speedup_vs_raster = raster N-step seconds / seconds at the same size, batch, CFG, draw, "
                    "precision, compile and kernels (both cached); speedup_vs_eager = the eager loop (compile off, "
                    "kernels aten) at the same setting / this; gflop = model FLOPs of one "
                    "generation from its decode plan (CFG's doubled batch included), mfu = gflops / the matmul "
                    "peak of the precision"}


# The speed claims (#18): (ordering, steps of 256, x the baseline's N one-token steps). The bench compares
# against these named methods; nothing outside the bench reads them.
BASELINE = "raster"
SPEED_TARGETS = (("arpg", 32, 8.0), ("randar", 88, 2.5))


def add_speedups(rows: list[dict], n: int) -> None:
    """speedup_vs_raster = raster's cached N-step seconds / this row's seconds (same size, batch, CFG, draw,
    precision, compile, kernels); speedup_vs_eager = the eager loop's seconds (sample.compile=off with torch's own
    kernels, sample.kernels=aten: the reference) at the same setting / this row's."""
    key = lambda r: (r["size"], r["batch"], r["cfg"], r["draw"], r.get("precision", "fp32"),  # noqa: E731
                     r.get("compile", "off"), r.get("kernels", "aten"))
    base = {key(r): r for r in rows if r["variant"] == BASELINE and r["kv_cache"] and r["steps"] == n}
    same = lambda r: (r["variant"], r["steps"], *key(r)[:5], r["kv_cache"])  # noqa: E731
    eager = {same(r): r for r in rows if r.get("compile", "off") == "off" and r.get("kernels", "aten") == "aten"}
    for r in rows:
        if key(r) in base:
            r["speedup_vs_raster"] = round(base[key(r)]["seconds"] / r["seconds"], 2)
            if r["cpu_s"] > 0 and base[key(r)]["cpu_s"] > 0:  # the same ratio in CPU time (load-robust on CPU)
                r["speedup_cpu"] = round(base[key(r)]["cpu_s"] / r["cpu_s"], 2)
        e = eager.get(same(r))
        if e is not None and e is not r:
            r["speedup_vs_eager"] = round(e["seconds"] / r["seconds"], 2)
            if r["cpu_s"] > 0:
                r["speedup_vs_eager_cpu"] = round(e["cpu_s"] / r["cpu_s"], 2)


def targets(rows: list[dict], n: int) -> dict:
    """The issue's sampling targets (cached rows): ARPG 32-of-256 steps >= 8x raster, RandAR 88-of-256 >= 2.5x;
    on the fast settings (sample.compile on/static, sample.kernels auto/onednn), every ordering >= 2x the eager
    loop at batch 1. The MFU
    target (batch 8 >= 0.7 of the matmul peak) is added by bench.add_mfu once the peak is known."""
    out = {}
    name = lambda r: (f"{r['variant']} {r['steps']} steps, {r['size']}, batch {r['batch']}, cfg {r['cfg']:g}, "  # noqa
                      f"{r['draw']}, {r.get('precision', 'fp32')}, compile {r.get('compile', 'off')}, "
                      f"kernels {r.get('kernels', 'aten')}")
    for variant, steps, goal in SPEED_TARGETS:
        for r in rows:
            claim = r["variant"] == variant and r["steps"] == scaled(steps, n)
            if claim and r["kv_cache"] and "speedup_vs_raster" in r:
                met = "met" if r["speedup_vs_raster"] >= goal else "NOT met"
                out[name(r)] = (f"{r['speedup_vs_raster']}x raster (target {goal:g}x: {met}; "
                                f"in CPU time {r.get('speedup_cpu', '-')}x)")
    for r in rows:
        if r["kv_cache"] and r["batch"] == 1 and "speedup_vs_eager" in r:
            met = "met" if r["speedup_vs_eager"] >= 2.0 else "NOT met"
            out[name(r) + " vs eager"] = (f"{r['speedup_vs_eager']}x the eager loop (target 2x: {met}; in CPU time "
                                          f"{r.get('speedup_vs_eager_cpu', '-')}x)")
    return out
