"""The fast decode path (``sample.compile``): the generation of ``sampling.generate``'s eager loop, with every
per-step decision taken once from the plan and one static-shaped step that ``torch.compile`` can capture (inductor
on a CPU; CUDA graphs through mode="reduce-overhead" on a GPU).

Per generation, at plan time (host syncs allowed here, never in the loop):
    probe    ordering.decode_step(state, n) on a state whose tokens are order index + 1: the step's Seq comes back
             with ``ids`` = gather indices into tokens_pad [B2, 1+N] (column 0 = no token). Orderings use
             state.tokens only by indexing (ordering.py, decode_step), so that Seq is the step's template.
    prepare  backbone.prepare_static(seq, cache): self / query masks over the cache's first key_bucket(max(rows)+1)
             rows (a static key count, at most nn/attention.KEY_BUCKETS per generation; the mask hides what the
             eager step's truncation to max(rows)+1 hides), rar_vit's cls prefix
    keep     editing: which of the step's positions are known, and their tokens; the CFG scale as a 0-d tensor
Per step (no host sync, no allocation outside the compiled graph):
    noise    the draw's random numbers, drawn eagerly from the generator into a buffer kept per step size, exactly
             as the eager draw draws them: torch.multinomial(p, 1) is argmax(p / q) with q = Exp(1) noise of p's
             shape (aten's one-sample path), inverse_cdf one uniform per token -> the same random stream
    step     ids = gather(tokens_pad) -> backbone(seq, cache, prepared) -> CFG mix -> temperature / top-k / top-p
             -> softmax -> argmax(p / q) or the CDF search -> known tokens kept -> written into tokens_pad
Numerics: the same tokens for the same seed as the eager loop; logits equal to fp32 rounding (the masked bucketed-key
attention and inductor's fused kernels may round differently in the last bit; tests/test_fast_decode.py).
Compiled steps are cached per backbone and configuration, each in its own code object (dynamo counts recompiles
per code object); the first two step shapes compile, later ones reuse a dynamic-shape graph.
"""
from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from lightning_modules.nn.attention import StaticPrep
from lightning_modules.nn.sequence import Seq
from lightning_modules.sampling import DecodePlan, DecodeState, SampleSettings, filter_logits

FULLGRAPH = False  # tests set True: a graph break in the step is then an error, not a silent slowdown
BACKEND = "inductor"  # the bench's --dry-run uses "eager": the same dynamo capture without inductor's compile time
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, Decoder]" = weakref.WeakKeyDictionary()


class StepPlan:
    """One decode step as the plan decides it: no token values, tensors only (static for the step's size)."""

    def __init__(self, seq: Seq, prep: StaticPrep, start: int, n: int, B: int, scale: float, device,
                 keep: tuple[torch.Tensor, torch.Tensor] | None):
        self.seq, self.prep, self.n = seq, prep, n
        self.write = torch.arange(1 + start, 1 + start + n, device=device)  # tokens_pad columns of its tokens
        self.scale = torch.tensor(scale, dtype=torch.float32, device=device)
        self.keep = keep  # (mask bool [B, n], tokens long [B, n]) or None: no known position in this step
        self.rows = B * n  # draws per step: one per (sample, new token)


def plan_steps(ordering, backbone, plan: DecodePlan, state: DecodeState, scales: list[float], cache,
               known_grid=None) -> list[StepPlan]:
    """Probe the ordering's decode_step for every step of the plan (see the module doc); no random numbers."""
    B2, N = state.tokens.shape
    B = plan.order.shape[0]
    dev = state.tokens.device
    index = torch.arange(1, N + 1, device=dev).expand(B2, N)  # tokens_pad column of order index i = i + 1
    probe = DecodeState(order=state.order, labels=state.labels, tokens=index, mode=state.mode,
                        num_positions=N, done=state.done)
    steps = []
    for t, n in enumerate(plan.counts):
        probe.step = t
        seq = ordering.decode_step(probe, n)
        seq.ids = seq.ids.clamp(0, N).long()  # non-token slots carry 0 (any value is ignored there)
        keep = None
        if known_grid is not None:
            positions = state.order[:B, probe.done: probe.done + n]
            mask, grid_tokens = known_grid
            if bool(mask[positions].any()):
                keep = (mask[positions], torch.gather(grid_tokens, 1, positions))
        prep = backbone.prepare_static(seq, cache)
        steps.append(StepPlan(seq, prep, probe.done, n, B, scales[t], dev, keep))
        probe.fed = probe.done
        probe.done += n
    return steps


def _step(backbone, cache, tokens_pad, t: Seq, prep: StaticPrep, write, scale, noise, keep, keep_tokens,
          cfg: bool, temperature: float, top_k: int, top_p: float, draw: str):
    """One decode step, every tensor static in shape. tokens_pad [B2, 1+N] is updated in place; returns the new
    tokens [B, n] and the mixed logits [B, n, V] (read only by a diagnostic recorder)."""
    seq = Seq(kind=t.kind, ids=tokens_pad.gather(1, t.ids), pos=t.pos, labels=t.labels, rows=t.rows,
              target=t.target, query_pos=t.query_pos, out=t.out)
    logits = backbone(seq, cache, prep).float()  # [B2, n, V]
    if cfg:
        cond, uncond = logits.chunk(2)
        logits = uncond + scale * (cond - uncond)
    B, n, V = logits.shape
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1).flatten(0, 1)  # [B*n, V]
    if draw == "inverse_cdf":
        cdf = probs.double().cumsum(-1)
        new = torch.searchsorted(cdf, noise * cdf[:, -1:], right=True).clamp(max=V - 1)
    else:  # torch.multinomial(probs, 1) with this Exp(1) draw (aten's one-sample path is exactly this)
        new = (probs / noise).argmax(-1)
    new = new.view(B, n)
    if keep is not None:
        new = torch.where(keep, keep_tokens, new)
    tokens_pad.index_copy_(1, write, new.repeat(tokens_pad.shape[0] // B, 1))
    return new, logits


def _own_code(fn):
    """A copy of ``fn`` with its own code object: dynamo keeps compiled graphs, and counts recompiles against its
    limit, per code object; each backbone x configuration gets its own cache instead of crowding one."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class Decoder:
    """Per backbone: the compiled step of each configuration, and the KV cache / token buffers reused across
    generations (CUDA graphs replay on fixed addresses; it also saves reallocating a cache per call)."""

    def __init__(self):
        self.steps: dict[tuple, object] = {}
        self.buffers: dict[tuple, tuple] = {}
        self.noise: dict[tuple, torch.Tensor] = {}

    def step_fn(self, key: tuple, compiled: bool, cuda: bool):
        if key not in self.steps:
            fn = _own_code(_step)
            if compiled:
                mode = "reduce-overhead" if cuda and BACKEND == "inductor" else None
                fn = torch.compile(fn, backend=BACKEND, mode=mode, fullgraph=FULLGRAPH)
            self.steps[key] = fn
        return self.steps[key]

    def cache(self, backbone, B2: int, N: int, cache_len: int, dtype, device, static: bool):
        key = (B2, N, cache_len, dtype, str(device))
        if key not in self.buffers:
            cache = backbone.new_cache(B2, cache_len, device=device, dtype=dtype)
            tokens = torch.zeros(B2, 1 + N, dtype=torch.long, device=device)
            if static:  # CUDA graphs: these are mutated in place by the graph, so their addresses must stay put
                for t in [tokens, *cache_tensors(cache)]:
                    torch._dynamo.mark_static_address(t)
            self.buffers[key] = (cache, tokens)
        cache, tokens = self.buffers[key]
        for t in cache_tensors(cache):
            t.zero_()  # stale rows are masked anyway; zeros keep a generation independent of the one before
        return cache, tokens

    def noise_buffer(self, rows: int, V: int, draw: str, device) -> torch.Tensor:
        shape, dtype = ((rows, 1), torch.float64) if draw == "inverse_cdf" else ((rows, V), torch.float32)
        key = (shape, dtype, str(device))
        if key not in self.noise:
            self.noise[key] = torch.empty(shape, dtype=dtype, device=device)
        return self.noise[key]


def cache_tensors(cache) -> list[torch.Tensor]:
    caches = list(cache.layers) + ([cache.shared] if getattr(cache, "shared", None) is not None else [])
    return [t for c in caches for t in (c.k, c.v)]


def decoder(backbone: nn.Module) -> Decoder:
    if backbone not in _DECODERS:
        _DECODERS[backbone] = Decoder()
    return _DECODERS[backbone]


@torch.no_grad()
def fast_generate(ordering, backbone, plan: DecodePlan, state: DecodeState, scales: list[float],
                  settings: SampleSettings, generator, known_grid=None, compiled: bool = True,
                  recorder=None) -> torch.Tensor:
    """The loop of ``sampling.generate`` on the fast path; codes long [B, N] in raster order. ``recorder``
    (diagnostics and tests only; ``generate`` sends runs with hooks to the eager loop) receives each step's
    mixed logits and tokens."""
    B2, N = state.tokens.shape
    B = plan.order.shape[0]
    device = state.tokens.device
    cuda = device.type == "cuda"
    dec = decoder(backbone)
    cache, tokens_pad = dec.cache(backbone, B2, N, ordering.cache_length(N), next(backbone.parameters()).dtype,
                                  device, static=compiled and cuda)
    tokens_pad[:, 1:] = state.tokens  # known tokens (editing) in order; -1 where not yet decoded (never read)
    steps = plan_steps(ordering, backbone, plan, state, scales, cache, known_grid)
    V = backbone.vocab_size
    # tf32: dynamo guards on the TF32 flag, so each setting gets its own code object (and recompile budget)
    key = (B2 > B, settings.temperature, settings.top_k, settings.top_p, settings.draw, settings.tf32)
    fn = dec.step_fn(key, compiled, cuda)
    for t, s in enumerate(steps):
        noise = dec.noise_buffer(s.rows, V, settings.draw, device)
        if settings.draw == "inverse_cdf":
            noise.uniform_(0, 1, generator=generator)  # = torch.rand(rows, 1, float64): the eager draw's stream
        else:
            noise.exponential_(1, generator=generator)  # = the Exp(1) draw inside torch.multinomial(p, 1)
        keep, keep_tokens = s.keep if s.keep is not None else (None, None)
        new, logits = fn(backbone, cache, tokens_pad, s.seq, s.prep, s.write, s.scale, noise, keep, keep_tokens,
                         B2 > B, settings.temperature, settings.top_k, settings.top_p, settings.draw)
        if recorder is not None:
            recorder(dict(step=t, logits_cfg=logits.clone(), tokens=new.clone()))  # CUDA graphs reuse outputs
    out = torch.empty(B, N, dtype=torch.long, device=device)
    out.scatter_(1, state.order[:B], tokens_pad[:B, 1:])  # back to raster order
    return out
