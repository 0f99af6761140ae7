"""sample.kernels: the sampling copy's oneDNN-prepacked linears (lightning_modules/nn/onednn.py) against torch's own
kernels — the same tokens for the same seed and logits equal to fp32 rounding for every ordering in the registry,
official and consistent modes, CFG on and off, both draws, in the eager loop and on the fast decode path (static,
and compiled as one graph); which linears each setting packs; the copy's caching; one-line refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_modules.nn.onednn as onednn
from conftest import VALID, make_module
from lightning_modules.base import make_generator
from lightning_modules.sampling import generate, sampling_backbone
from test_fast_decode import LABELS, dynamo_backend, fast_trace, settings_matrix  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(onednn.unavailable("cpu", torch.float32) is not None,
                                 reason=str(onednn.unavailable("cpu", torch.float32)))]


def traced(m, s, seed=11, kernels="aten"):
    """The eager loop with a recorder: (codes, [mixed logits per step])."""
    s.kernels = kernels
    rec = []
    codes = generate(m, LABELS, s, make_generator(seed), recorder=rec.append)
    return codes, [r["logits_cfg"] for r in rec]


def assert_same(reference, other, what: str):
    (a, la), (b, lb) = reference, other
    assert torch.equal(a, b), f"{what}: tokens differ"
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=f"{what}: logits differ")


def packed_names(backbone: nn.Module) -> set[str]:
    return {name for name, mod in backbone.named_modules() if isinstance(mod, onednn.PackedLinear)}


def linear_names(backbone: nn.Module) -> set[str]:
    return {name for name, mod in backbone.named_modules() if isinstance(mod, nn.Linear)}


@pytest.mark.parametrize("variant,flavour", VALID)
def test_onednn_sampling_matches_aten_in_the_eager_loop(variant, flavour):
    m = make_module(variant, flavour)
    assert packed_names(sampling_backbone(m.backbone, "fp32", "onednn")) == linear_names(m.backbone)  # all of them
    for i, (mode, steps, cfg) in enumerate(settings_matrix(m)):
        draw = ("multinomial", "inverse_cdf")[(i + i // 2) % 2]
        s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode, draw=draw)
        assert_same(traced(m, s), traced(m, s, kernels="onednn"), f"{variant}/{flavour} {mode} {steps} cfg {cfg}")


@pytest.mark.parametrize("variant,flavour", VALID)
def test_onednn_static_step_matches_the_aten_eager_loop(variant, flavour):
    m = make_module(variant, flavour)
    for mode, steps, cfg in settings_matrix(m)[::2]:
        s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode)
        reference = traced(m, s)
        s.kernels = "onednn"
        assert_same(reference, fast_trace(m, LABELS, s, 11), f"{variant}/{flavour} static {mode} cfg {cfg}")


@pytest.mark.parametrize("variant,flavour", VALID)
def test_onednn_compiled_step_is_one_graph_and_matches(variant, flavour, dynamo_backend):  # noqa: F811
    from torch._dynamo.utils import counters

    dynamo_backend("aot_eager")  # the packed weight is a graph input of the opaque roar::onednn_linear
    m = make_module(variant, flavour)
    mode, steps, cfg = settings_matrix(m)[0]
    s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode)
    reference = traced(m, s)
    s.kernels = "onednn"
    counters.clear()
    assert_same(reference, fast_trace(m, LABELS, s, 11, compiled=True), f"{variant}/{flavour} compiled")
    assert 1 <= counters["stats"]["unique_graphs"] <= 4  # as tests/test_fast_decode.py: one per size / key regime


@pytest.mark.slow
def test_onednn_inductor_compiled_step_matches(dynamo_backend):  # noqa: F811
    dynamo_backend("inductor")  # inductor keeps the custom op as an extern kernel (its aten lowering cannot)
    m = make_module("arpg")
    mode, steps, cfg = settings_matrix(m)[0]
    s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode)
    reference = traced(m, s)
    s.kernels = "onednn"
    assert_same(reference, fast_trace(m, LABELS, s, 11, compiled=True), "arpg inductor")


def test_auto_packs_only_the_linears_big_enough_to_win(monkeypatch):
    m = make_module("arpg")  # dim 64: fused wqkv 64x192 = 12288 entries, wo 64x64 = 4096, head 11x64
    assert onednn.kernel_threshold("auto", "cpu", torch.float32, "sample.kernels") == onednn.AUTO_MIN_ENTRIES
    assert sampling_backbone(m.backbone, "fp32", "auto") is m.backbone  # a debug model has none that big
    assert sampling_backbone(m.backbone, "fp32", "aten") is m.backbone
    monkeypatch.setattr(onednn, "AUTO_MIN_ENTRIES", 64 * 192)
    copy = sampling_backbone(m.backbone, "fp32", "auto")
    big = {n for n, mod in m.backbone.named_modules()
           if isinstance(mod, nn.Linear) and mod.weight.numel() >= 64 * 192}
    assert big and packed_names(copy) == big
    assert linear_names(copy) == linear_names(m.backbone) - big  # the small ones stay torch's nn.Linear
    # cuBLAS on a GPU: nothing to pack
    assert onednn.kernel_threshold("auto", "cuda", torch.float32, "sample.kernels") is None


def test_the_packed_copy_is_cached_follows_the_weights_and_leaves_them_alone():
    m = make_module("randar")
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    packed = sampling_backbone(m.backbone, "fp32", "onednn")
    assert packed is not m.backbone and sampling_backbone(m.backbone, "fp32", "onednn") is packed
    # the copy holds no dense copy of a packed linear: its parameters are the norms and embeddings only
    dense = sum(p.numel() for p in packed.parameters())
    assert dense == sum(p.numel() for p in m.backbone.parameters()) - sum(
        mod.weight.numel() + (0 if mod.bias is None else mod.bias.numel())
        for mod in m.backbone.modules() if isinstance(mod, nn.Linear))
    assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())
    head = m.backbone.output
    x = torch.randn(3, head.in_features)
    torch.testing.assert_close(packed.output(x), head(x).detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # an optimizer step / EMA swap / load: a fresh copy with the new weights
        head.weight.mul_(-1.0)
    fresh = sampling_backbone(m.backbone, "fp32", "onednn")
    assert fresh is not packed
    torch.testing.assert_close(fresh.output(x), head(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(onednn.unavailable("cpu", torch.bfloat16) is not None,
                    reason=str(onednn.unavailable("cpu", torch.bfloat16)))
def test_bf16_packed_sampling_equals_bf16_aten_to_rounding():
    m = make_module("arpg", vocab=64)
    s = m.sample_settings(num_steps=4, cfg_scale=2.0, precision="bf16")
    greedy = lambda logits, pos: logits.argmax(-1)  # noqa: E731  (one decode path for both kernels)
    out = {}
    for kernels in ("aten", "onednn"):
        s.kernels, rec = kernels, []
        out[kernels] = generate(m, LABELS, s, make_generator(0), recorder=rec.append, draw=greedy), rec
    assert all(isinstance(mod, onednn.PackedLinear) and mod.packed_weight.dtype == torch.bfloat16
               for mod in sampling_backbone(m.backbone, "bf16", "onednn").modules()
               if isinstance(mod, (nn.Linear, onednn.PackedLinear)))
    for a, b in zip(out["aten"][1], out["onednn"][1]):
        scale = a["logits_cond"].abs().max()
        assert (a["logits_cond"] - b["logits_cond"]).abs().max() < 0.02 * scale  # bf16 rounding either way


def test_kernels_the_device_cannot_run_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^sample.kernels=onednn: .*runs on a CPU.*cuda$"):
        onednn.kernel_threshold("onednn", "cuda", torch.float32, "sample.kernels")
    with pytest.raises(ValueError, match=r"^sample.kernels: unknown kernels 'mkl'"):
        onednn.kernel_threshold("mkl", "cpu", torch.float32, "sample.kernels")
    m = make_module("raster")
    with pytest.raises(ValueError, match="sample.kernels"):
        generate(m, LABELS, m.sample_settings(kernels="mkl"), make_generator(0))


def test_the_multi_rank_callback_runs_sample_through_packed_linears():
    """tests/test_scale_callbacks.py (2 ranks, DDP / ZeRO-2 / ZeRO-3 / offload, every callback on) relies on its
    model.dim=128 x model.ffn_hidden=1024 FFN linears being packed by auto: keep the threshold within reach."""
    m = make_module("raster", dim=128, ffn_hidden=1024)
    for precision in ("fp32", "bf16") if onednn.unavailable("cpu", torch.bfloat16) is None else ("fp32",):
        packed = packed_names(sampling_backbone(m.backbone, precision, "auto"))
        assert packed == {f"layers.{i}.feed_forward.{w}" for i in range(2) for w in ("w1", "w2", "w3")}
