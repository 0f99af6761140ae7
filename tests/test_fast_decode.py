"""The fast decode path (sample.compile, lightning_modules/fast_decode.py) against the eager loop: the same tokens for
the same seed and logits equal to fp32 rounding, for every ordering in the registry, official and consistent modes,
CFG on and off, both draws, top-k / top-p / temperature, and editing (known tokens); the compiled step captures
as one graph per shape with no graph break (no host sync inside a step) and is reused across calls.

The static step runs without torch.compile for the whole matrix (fast); the compiled step runs through dynamo
with the aot_eager backend (functionalisation of the in-place cache and token writes, no C++ compile) for every
ordering, and through inductor for two orderings (slow: ~1-2 min of C++ compilation each on a 2-core machine)."""
from __future__ import annotations

import pytest
import torch

import lightning_modules.fast_decode as fast_decode
from conftest import VALID, make_module
from lightning_modules.base import make_generator
from lightning_modules.sampling import fast_path, generate, start_state, step_scales

LABELS = torch.tensor([0, 3, 4])


def settings_matrix(m):
    """(mode, steps, cfg) per ordering: the multi-token orderings in both modes; cfg 1 = single batch."""
    if m.ordering.capabilities.parallel:
        return [("official", 3, 2.5), ("official", 16, 1.0), ("consistent", 5, 2.5), ("consistent", 4, 1.0)]
    return [("official", 16, 2.5), ("official", 16, 1.0)]


def fast_trace(m, labels, s, seed, known=None, compiled=False):
    """fast_generate with its diagnostic recorder: (codes, [mixed logits per step])."""
    from lightning_modules.sampling import sampling_backbone

    backbone = sampling_backbone(m.backbone, s.precision, s.kernels)
    N = backbone.num_positions
    g = make_generator(seed)
    plan = m.ordering.decode_plan(labels.shape[0], s.num_steps, s.schedule, g, known, None, labels.device)
    scales = step_scales(m.ordering, plan, s, N)
    state = start_state(plan, labels, any(x != 1.0 for x in scales), backbone.num_classes, N, s.mode)
    known_grid = None
    if known is not None:
        known_grid = known
        state.tokens[:, : plan.num_known] = torch.gather(known[1], 1, plan.order[:, : plan.num_known]).repeat(
            state.tokens.shape[0] // labels.shape[0], 1)
    rec = []
    codes = fast_decode.fast_generate(m.ordering, backbone, plan, state, scales, s, g, known_grid, compiled,
                                      recorder=rec.append)
    return codes, [r["logits_cfg"] for r in rec]


def eager_trace(m, labels, s, seed, known=None):
    rec = []
    codes = generate(m, labels, s, make_generator(seed), known=known, recorder=rec.append)  # a hook: eager
    return codes, [r["logits_cfg"] for r in rec]


def assert_same(m, labels, s, seed=11, known=None, compiled=False, what=""):
    a, la = eager_trace(m, labels, s, seed, known)
    b, lb = fast_trace(m, labels, s, seed, known, compiled)
    assert torch.equal(a, b), f"{what}: tokens differ"
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=f"{what}: logits differ")
    if known is not None:
        mask, tokens = known
        assert torch.equal(b[:, mask], tokens[:, mask]), f"{what}: known tokens not kept"


@pytest.mark.parametrize("variant,flavour", VALID)
def test_static_step_matches_the_eager_loop(variant, flavour):
    m = make_module(variant, flavour)
    for i, (mode, steps, cfg) in enumerate(settings_matrix(m)):
        draw = ("multinomial", "inverse_cdf")[(i + i // 2) % 2]  # parallel orderings: each draw, CFG on and off
        s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode, draw=draw)
        assert_same(m, LABELS, s, what=f"{variant}/{flavour} {mode} {steps} cfg {cfg} {draw}")
    s = m.sample_settings(num_steps=settings_matrix(m)[0][1], cfg_scale=3.0, temperature=0.7, top_k=5, top_p=0.8)
    assert_same(m, LABELS, s, what=f"{variant}/{flavour} filtered")


@pytest.mark.parametrize("variant,flavour", VALID)
def test_static_step_keeps_known_tokens_like_the_eager_loop(variant, flavour):
    from lightning_modules.editing import fit_steps

    m = make_module(variant, flavour)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 1, 5, 6, 9, 15]] = True
    tokens = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(2))
    for mode, steps, cfg in settings_matrix(m)[:3:2]:
        s = fit_steps(m, m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode), (mask, tokens))
        assert_same(m, LABELS, s, known=(mask, tokens), what=f"{variant}/{flavour} editing {mode} cfg {cfg}")


def test_generate_routes_by_setting_and_device():
    assert not fast_path("auto", "cpu") and fast_path("auto", "cuda")  # CPU: compile does not pay back (docs)
    assert fast_path("on", "cpu") and fast_path("static", "cpu") and not fast_path("off", "cuda")
    assert not fast_path("on", "cuda", hooks=True)  # a custom draw or a recorder needs the eager tensors
    with pytest.raises(ValueError, match="sample.compile"):
        fast_path("fast", "cpu")
    m = make_module("randar")
    s = m.sample_settings(num_steps=5, cfg_scale=2.0)
    a = generate(m, LABELS, s, make_generator(3))
    s.compile = "static"
    assert torch.equal(generate(m, LABELS, s, make_generator(3)), a)


@pytest.fixture
def dynamo_backend(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(fast_decode, "FULLGRAPH", True)  # a graph break (a host sync, say) is an error
    yield lambda name: monkeypatch.setattr(fast_decode, "BACKEND", name)
    torch._dynamo.reset()


@pytest.mark.parametrize("variant,flavour", VALID)
def test_compiled_step_is_one_graph_and_matches(variant, flavour, dynamo_backend):
    from torch._dynamo.utils import counters

    dynamo_backend("aot_eager")
    m = make_module(variant, flavour)
    mode, steps, cfg = settings_matrix(m)[0]
    s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode)
    counters.clear()
    assert_same(m, LABELS, s, compiled=True, what=f"{variant}/{flavour} compiled")
    graphs = counters["stats"]["unique_graphs"]
    # a static graph, a dynamic-shape one for the later sizes and key counts, one for size 1, and one where the key
    # count is the whole cache (its slice is contiguous, which the dynamic graph's guards tell apart)
    assert 1 <= graphs <= 4
    assert_same(m, LABELS, s, seed=12, compiled=True, what=f"{variant}/{flavour} compiled, second call")
    assert counters["stats"]["unique_graphs"] == graphs  # cached on the module: no recompilation


@pytest.mark.slow
@pytest.mark.parametrize("variant,flavour", [("arpg", "llama"), ("raster", "rar_vit")])
def test_inductor_compiled_step_matches(variant, flavour, dynamo_backend):
    dynamo_backend("inductor")
    m = make_module(variant, flavour)
    mode, steps, cfg = settings_matrix(m)[0]
    assert_same(m, LABELS, m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode), compiled=True,
                what=f"{variant}/{flavour} inductor")


@pytest.mark.parametrize("variant,flavour", [("raster", "llama"), ("arpg", "llama"), ("randar", "llama"),
                                             ("rar", "rar_vit")])
def test_static_steps_read_the_cache_only_up_to_the_next_bucket(variant, flavour, monkeypatch):
    """Each fast-path step attends over its visible length rounded up to the next 1/KEY_BUCKETS of the cache (not
    the whole cache, which read ~2x the keys a raster step needs); the same tokens either way."""
    from lightning_modules.nn import attention
    from lightning_modules.sampling import sampling_backbone

    m = make_module(variant, flavour)
    mode, steps, cfg = settings_matrix(m)[0]
    s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode)
    backbone = sampling_backbone(m.backbone, s.precision, s.kernels)
    plan = m.ordering.decode_plan(3, s.num_steps, s.schedule, make_generator(0), None, None, LABELS.device)
    state = start_state(plan, LABELS, True, backbone.num_classes, backbone.num_positions, s.mode)
    cache = backbone.new_cache(6, m.ordering.cache_length(backbone.num_positions))
    scales = step_scales(m.ordering, plan, s, backbone.num_positions)
    total = cache.layers[0].k.shape[2]
    keys = [p.prep.mask.shape[-1] for p in fast_decode.plan_steps(m.ordering, backbone, plan, state, scales, cache)]
    size = -(-total // attention.KEY_BUCKETS)
    assert all(k % size == 0 or k == total for k in keys) and keys == sorted(keys) and keys[-1] <= total
    assert keys[0] < total and sum(keys) < 0.75 * total * len(keys)  # early steps read a fraction of the cache
    codes = fast_trace(m, LABELS, s, 11)[0]
    monkeypatch.setattr(attention, "KEY_BUCKETS", 1)  # the whole cache every step: the same tokens
    assert torch.equal(codes, fast_trace(m, LABELS, s, 11)[0])


def test_a_training_runs_sampling_events_sample_eagerly_and_keep_nothing_after(monkeypatch):
    """Every sampling callback samples inside callbacks/gathered.py::sampling_module, between two training steps:
    there sample.compile=auto takes the eager loop even on CUDA (the fast path keeps its KV cache, buffers and
    CUDA graphs per configuration on the device for the backbone's lifetime), and the bf16 / prepacked sampling
    copy is dropped on exit (the next optimizer step makes it stale). Outside an event, auto on CUDA is fast.
    The route is read as it would be on CUDA: the spy asks fast_path about "cuda", then runs the eager loop."""
    import lightning_modules.sampling as sampling
    from lightning_modules.callbacks.gathered import sampling_module

    real, asked = sampling.fast_path, []

    def on_cuda(setting, device, hooks=False):
        asked.append((real(setting, "cuda", hooks), m.backbone in sampling._SAMPLING_COPIES))
        return False

    monkeypatch.setattr(sampling, "fast_path", on_cuda)
    m = make_module("arpg")
    with sampling_module(None, m) as (module, used_ema):
        assert module is m and not used_ema
        inside = module.sample_codes(LABELS, seed=0, num_steps=4, cfg_scale=2.0, precision="bf16")
    assert asked == [(False, True)]  # eager, from the bf16 copy ...
    assert m.backbone not in sampling._SAMPLING_COPIES  # ... which is gone after the event
    outside = m.sample_codes(LABELS, seed=0, num_steps=4, cfg_scale=2.0, precision="bf16")
    assert asked[1] == (True, True) and m.backbone in sampling._SAMPLING_COPIES  # a sampling run keeps both
    assert torch.equal(inside, outside)


@pytest.mark.parametrize("variant", ["raster", "arpg"])
def test_a_dropped_module_takes_its_fast_path_state_with_it(variant, dynamo_backend):
    """ablate and study evaluate arm after arm in one process: once an arm's module is dropped, its fast-path state
    (KV cache, token buffers, compiled steps: fast_decode._DECODERS, keyed weakly by backbone) goes with it, i.e.
    nothing the compiled step or dynamo's guards keep holds the backbone (checked with inductor too, by hand)."""
    import gc
    import weakref

    dynamo_backend("aot_eager")
    m = make_module(variant)
    mode, steps, cfg = settings_matrix(m)[0]
    generate(m, LABELS, m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode, compile="on"), make_generator(0))
    assert m.backbone in fast_decode._DECODERS
    backbone, module = weakref.ref(m.backbone), weakref.ref(m)
    del m
    gc.collect()
    assert backbone() is None and module() is None
    assert not any(True for _ in fast_decode._DECODERS.keys())


@pytest.mark.parametrize("compile_setting", ["off", "static"])
def test_speed_figures_leave_the_compiling_calls_out(compile_setting, monkeypatch):
    """ablate's and the demo's images/s (sample_set.timed_sample_set): on the fast path each batch size is sampled
    once untimed first, so a compile (here a stand-in: the first call per batch size sleeps) stays out of the figure;
    the eager loop is timed as it runs. Batches of 4, 4 and 2: two batch sizes, the same images either way."""
    import time

    from lightning_modules.sample_set import timed_sample_set

    m, calls = make_module("arpg"), []
    real = m.sample_images

    def first_call_per_size_is_slow(labels, seed, **overrides):
        calls.append(len(labels))
        if calls.count(len(labels)) == 1:
            time.sleep(0.4)
        return real(labels, seed, **overrides)

    monkeypatch.setattr(m, "sample_images", first_call_per_size_is_slow)
    images, labels, per_s = timed_sample_set(m, 10, 4, 0, num_steps=4, compile=compile_setting)
    assert images.shape[0] == 10 and labels.tolist() == [i % 5 for i in range(10)]
    if compile_setting == "off":  # CPU auto is this: nothing extra, the slow calls timed
        assert calls == [4, 4, 2] and per_s < 10 / 0.8
    else:
        assert calls == [4, 4, 4, 2, 2] and per_s > 10 / 0.4
    monkeypatch.undo()
    assert torch.equal(images, timed_sample_set(m, 10, 4, 0, num_steps=4, compile="off")[0])
