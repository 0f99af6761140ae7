"""The one sampling loop. Every ordering supplies a decode plan and per-step inputs; nothing here knows a method.

    plan  = ordering.decode_plan(batch, num_steps, schedule, generator, known)  # order [B,N] + tokens per step
    state = DecodeState(...)                                                    # what is decoded / in the cache
    per step t:  seq = ordering.decode_step(state, n_t)   ->  backbone(seq, cache) -> logits [B2, n_t, V]
                 CFG mix (scale from the module's cfg count)  ->  draw  ->  known tokens kept  ->  advance
CFG doubles the batch to [cond ; null] only when some step's scale differs from 1.
"""
from __future__ import annotations

import contextvars
import copy
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lightning_modules.schedules import cfg_scale
from lightning_modules.tf32 import cuda_tf32


@dataclass
class DecodePlan:
    order: torch.Tensor  # long [B, N]: raster position decoded i-th (known positions first)
    counts: list[int]  # tokens decoded per step (unknown positions only); sum = N - num_known
    num_known: int = 0  # order[:, :num_known] are given (editing); teacher-forced in the first step


@dataclass
class DecodeState:
    """What the ordering needs to lay out a step. Indices are *order* indices (i-th decoded), not positions."""

    order: torch.Tensor  # long [B2, N]
    labels: torch.Tensor  # long [B2]: cond labels, then null labels when CFG is on
    tokens: torch.Tensor  # long [B2, N]: token at order index i (-1 until known)
    step: int = 0
    fed: int = 0  # order indices [0, fed) are in the KV cache as inputs
    done: int = 0  # order indices [0, done) are known or decoded
    mode: str = "official"  # "official" (the released samplers' attention) or "consistent" (training context)
    num_positions: int = 0
    extra: dict = field(default_factory=dict)  # per-ordering bookkeeping (e.g. cache rows)

    @property
    def first(self) -> bool:
        return self.step == 0


@dataclass
class SampleSettings:
    """The resolved settings of one generate() call (every field set). The config's SampleConfig
    (lightning_modules/hparams.py) has the same fields but "empty = the ordering's default"; ARModule.sample_settings
    turns one into the other."""

    num_steps: int
    schedule: str
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    cfg_power: float = 1.0
    cfg_start: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    mode: str = "official"
    draw: str = "multinomial"  # multinomial (the reference random stream) | inverse_cdf (fast on CPU; see below)
    precision: str = "fp32"  # fp32 | bf16: the backbone's weights and activations while sampling (sampling_backbone)
    compile: str = "auto"  # auto | on | off | static: the fast decode path (lightning_modules/fast_decode.py)
    kernels: str = "auto"  # auto | aten | onednn: the linears' kernels while sampling (sampling_backbone)
    tf32: bool = True  # CUDA fp32 matmuls / convolutions in TF32 while generating (lightning_modules/tf32.py)


DRAWS = ("multinomial", "inverse_cdf")
COMPILE = ("auto", "on", "off", "static")  # static: the fast loop without torch.compile (tests, measurements)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
_SAMPLING_COPIES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_TRAINING_EVENT = contextvars.ContextVar("roar_sampling_between_training_steps", default=False)


@contextmanager
def between_training_steps(module: nn.Module):
    """Sampling inside a training run (every sampling callback enters this through callbacks/gathered.py):
    ``sample.compile=auto`` takes the eager loop, and the sampling copy (bf16 / prepacked) of ``module``'s backbone
    is dropped on exit. The training steps that follow then get back every byte the sampling used: the fast path
    keeps a KV cache, token buffers and CUDA graphs per configuration for as long as the backbone lives (what lets it
    replay; at L size, batch 50 with CFG, ~5 GB of fp32 K/V), and the next optimizer step makes the copy stale."""
    token = _TRAINING_EVENT.set(True)
    try:
        yield
    finally:
        _TRAINING_EVENT.reset(token)
        backbone = getattr(module, "backbone", None)  # None: a callback test's stand-in generator
        if backbone is not None:
            _SAMPLING_COPIES.pop(backbone, None)


def sampling_backbone(backbone: nn.Module, precision: str, kernels: str = "aten") -> nn.Module:
    """The backbone to sample with: itself for fp32 with torch's kernels, else a copy whose *parameters* are cast
    (bf16, as the official LlamaGen / RandAR / ARPG samplers cast their GPT) and whose big linears are prepacked for
    oneDNN (nn/onednn.py: ``kernel_threshold``). Buffers stay fp32 (RoPE angles), and the norms and RoPE compute in
    fp32 as in training. A copy, not an in-place change, because casting the trained fp32 weights would lose their
    low bits for good, and packed weights cannot train. It is cached per backbone and rebuilt when any parameter
    changed since (an optimizer step, an EMA swap or a load bumps the tensors' version counters)."""
    from lightning_modules.nn.onednn import big_linears, kernel_threshold, packed_replacements

    if precision not in PRECISIONS:
        raise ValueError(f"sample.precision: unknown precision {precision!r} (choose from {list(PRECISIONS)})")
    dtype = PRECISIONS[precision]
    params = list(backbone.parameters())
    threshold = kernel_threshold(kernels, params[0].device, dtype, "sample.kernels")
    packed = [] if threshold is None else big_linears(backbone, threshold)  # none: auto on a small model = aten
    if not packed and all(p.dtype == dtype for p in params):
        return backbone
    key = (dtype, threshold if packed else None, tuple((p.data_ptr(), p._version) for p in params))
    cached = _SAMPLING_COPIES.get(backbone)
    if cached is not None and cached[0] == key:
        return cached[1]
    _SAMPLING_COPIES.pop(backbone, None)  # the stale copy goes before the new one is built (peak memory)
    memo = packed_replacements(packed, dtype)
    copied = copy.deepcopy(backbone, memo).eval()
    for p in copied.parameters():
        p.data = p.data.to(dtype)
    _SAMPLING_COPIES[backbone] = (key, copied)
    return copied


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, n, V] -> /max(T, 1e-5), top-k, top-p (keep >= 1): what both decode paths draw from."""
    if temperature != 1.0:  # x / 1.0 == x exactly: skipping it saves a [B, n, V] copy and changes nothing
        logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # the first token is always kept
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None, draw: str = "multinomial") -> torch.Tensor:
    """logits [B, n, V] -> tokens [B, n]: /max(T,1e-5), top-k, top-p (keep >= 1), softmax, categorical draw.

    draw="multinomial" is torch.multinomial: it draws V exponentials per token (argmax p/q), which on CPU is
    about a third of a small model's sampling time. draw="inverse_cdf" samples the same distribution exactly
    with ONE uniform per token (float64 CDF, so no bin is lost to rounding; zero-probability tokens can never be
    picked) — a different random stream, so the same seed gives different (equally distributed) tokens."""
    if draw not in DRAWS:
        raise ValueError(f"sample.draw: unknown draw {draw!r} (choose from {DRAWS})")
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1).flatten(0, 1)  # [B*n, V]
    if draw == "inverse_cdf":
        cdf = probs.double().cumsum(-1)  # [B*n, V]
        u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, generator=generator, device=cdf.device) * cdf[:, -1:]
        # the first bin whose cumulative mass exceeds u; u < total, so one always does (clamp: NaN safety)
        return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).view(logits.shape[:2])
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])


def step_scales(ordering, plan: DecodePlan, settings: SampleSettings, N: int) -> list[float]:
    """The CFG scale of every step, from the count the ordering ramps on (before the step, or including it)."""
    scales, before = [], plan.num_known
    for n in plan.counts:
        count = before + n if ordering.cfg_counts_current_step else before
        scales.append(cfg_scale(settings.cfg_schedule, settings.cfg_scale, count, N, settings.cfg_power,
                                settings.cfg_start))
        before += n
    return scales


def start_state(plan: DecodePlan, labels: torch.Tensor, use_cfg: bool, num_classes: int, N: int,
                mode: str) -> DecodeState:
    """The state before step 0: the batch doubled to [cond; null] when CFG is on; nothing decoded but the known."""
    reps = 2 if use_cfg else 1
    device = labels.device
    null = torch.full_like(labels, num_classes)
    return DecodeState(order=plan.order.to(device).repeat(reps, 1),
                       labels=torch.cat([labels, null]) if use_cfg else labels,
                       tokens=torch.full((labels.shape[0] * reps, N), -1, dtype=torch.long, device=device),
                       mode=mode, num_positions=N, done=plan.num_known)


def fast_path(setting: str, device, hooks: bool = False) -> bool:
    """Whether ``generate`` takes the fast decode path (sample.compile; lightning_modules/fast_decode.py).

    off: the eager loop (the reference). on: the static step, torch.compile'd (CUDA graphs on a GPU). static: the
    static step without torch.compile. auto: on with CUDA, where a decode step is launch-bound and CUDA graphs
    remove that; off on a CPU, where compiling costs tens of seconds per step shape and a batch-1 step is bound by
    streaming the weights, not by dispatch (docs/benchmarks.md: the measured gain does not pay the compile back
    within one generation); off between training steps (``between_training_steps``: the sampling callbacks), where
    the fast path's per-configuration buffers and graphs would hold device memory the training step needs. A custom
    draw or a recorder always takes the eager loop: they read each step's eager tensors (parity traces, order
    maps), which the fused step never materialises."""
    if setting not in COMPILE:
        raise ValueError(f"sample.compile: unknown setting {setting!r} (choose from {COMPILE[:3]})")
    if hooks or setting == "off":
        return False
    if setting != "auto":
        return True
    return torch.device(device).type == "cuda" and not _TRAINING_EVENT.get()


Recorder = Callable[[dict], None]
Draw = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (mixed logits [B,n,V], positions [B,n]) -> [B,n]


@torch.no_grad()
def generate(model, labels: torch.Tensor, settings: SampleSettings, generator: torch.Generator | None = None,
             known: tuple[torch.Tensor, torch.Tensor] | None = None, draw: Draw | None = None,
             recorder: Recorder | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
    """Generate codes long [B, N] in raster order.

    model: anything with ``.ordering`` (lightning_modules/ordering.py) and ``.backbone`` — an ARModule, or a plain
    pair: sampling needs no Lightning.

    known: (mask bool [N], tokens long [B, N]) — positions given up front (inpainting, editing); kept exactly.
    draw: replaces the random draw (parity traces force tokens); recorder: receives every step's tensors.
    order: an explicit decode order [B, N] (known positions first), overriding the ordering's own draw.
    ``settings.tf32`` holds for the whole generation, and only for it.
    """
    with cuda_tf32(settings.tf32):
        return _generate(model, labels, settings, generator, known, draw, recorder, order)


def _generate(model, labels, settings, generator, known, draw, recorder, order) -> torch.Tensor:
    ordering = model.ordering
    backbone = sampling_backbone(model.backbone, settings.precision, settings.kernels)
    B, N = labels.shape[0], backbone.num_positions
    device = labels.device
    plan = ordering.decode_plan(B, settings.num_steps, settings.schedule, generator, known, order, device)
    scales = step_scales(ordering, plan, settings, N)
    use_cfg = any(s != 1.0 for s in scales)
    reps = 2 if use_cfg else 1
    state = start_state(plan, labels, use_cfg, backbone.num_classes, N, settings.mode)
    known_grid = None
    if known is not None:
        mask, known_tokens = known
        known_grid = (mask.to(device), known_tokens.to(device))
        in_order = torch.gather(known_tokens.to(device), 1, plan.order[:, : plan.num_known].to(device))
        state.tokens[:, : plan.num_known] = in_order.repeat(reps, 1)
    if fast_path(settings.compile, device, hooks=draw is not None or recorder is not None):
        from lightning_modules.fast_decode import fast_generate

        return fast_generate(ordering, backbone, plan, state, scales, settings, generator, known_grid,
                             compiled=settings.compile != "static")
    cache = backbone.new_cache(B * reps, ordering.cache_length(N), device=device,
                               dtype=next(backbone.parameters()).dtype)
    for t, n in enumerate(plan.counts):
        state.step = t
        seq = ordering.decode_step(state, n)
        logits = backbone(seq, cache).float()  # [B*reps, n, V]; CFG mix and draw in fp32 at any precision
        positions = state.order[:B, state.done: state.done + n]  # [B, n]
        if use_cfg:
            cond, uncond = logits.chunk(2)
            mixed = uncond + scales[t] * (cond - uncond)
        else:
            cond, uncond, mixed = logits, None, logits
        if draw is not None:
            new = draw(mixed, positions)
        else:
            new = sample_logits(mixed, settings.temperature, settings.top_k, settings.top_p, generator, settings.draw)
        kept = None
        if known_grid is not None:  # orderings that cannot skip known positions (raster) still keep them exactly
            mask, grid_tokens = known_grid
            kept = mask[positions]  # [B, n]
            new = torch.where(kept, torch.gather(grid_tokens, 1, positions), new)
        if recorder is not None:
            record = dict(step=t, positions=positions, logits_cond=cond, logits_uncond=uncond, logits_cfg=mixed,
                          cfg_scale=scales[t], tokens=new)
            if kept is not None:  # a fixed order visits known positions too: say they were kept, not generated
                record["kept"] = kept
            recorder(record)
        state.tokens[:, state.done: state.done + n] = new.repeat(reps, 1)
        state.fed = state.done
        state.done += n
    out = torch.empty(B, N, dtype=torch.long, device=device)
    out.scatter_(1, state.order[:B], state.tokens[:B])  # back to raster order
    return out
