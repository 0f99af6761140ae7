"""sample.precision=bf16: a cached bf16 copy samples (as the official samplers do), the fp32 weights stay intact,
the copy follows weight updates, and the bf16 logits track the fp32 ones along the same decode path."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.sampling import generate, sampling_backbone
from conftest import VALID, make_module

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fp32_is_the_backbone_itself_and_bf16_a_cached_copy():
    m = make_module("arpg")
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    assert sampling_backbone(m.backbone, "fp32") is m.backbone
    low = sampling_backbone(m.backbone, "bf16")
    assert low is not m.backbone and sampling_backbone(m.backbone, "bf16") is low  # cached
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    assert all(b.dtype == before_b.dtype for b, before_b in zip(low.buffers(), m.backbone.buffers()))  # RoPE fp32
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    with torch.no_grad():  # an optimizer step / EMA swap / load changes the weights in place: a new copy
        next(m.backbone.parameters()).add_(1.0)
    fresh = sampling_backbone(m.backbone, "bf16")
    assert fresh is not low
    assert torch.equal(next(fresh.parameters()), next(m.backbone.parameters()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="sample.precision"):
        sampling_backbone(m.backbone, "fp8")


@pytest.mark.parametrize("variant,flavour", VALID)
def test_bf16_sampling_tracks_fp32_along_the_same_path(variant, flavour):
    m = make_module(variant, flavour, vocab=64)
    labels = torch.tensor([0, 3])
    logs = {}
    for precision in ("fp32", "bf16"):
        steps = []
        s = m.sample_settings(num_steps=4 if m.ordering.capabilities.parallel else 16, cfg_scale=2.0,
                              precision=precision)
        codes = generate(m, labels, s, torch.Generator().manual_seed(0), recorder=steps.append,
                         draw=lambda logits, pos: logits.argmax(-1))  # a path both precisions follow
        logs[precision] = (codes, steps)
    (c32, s32), (c16, s16) = logs["fp32"], logs["bf16"]
    assert c16.shape == c32.shape and int(c16.min()) >= 0 and int(c16.max()) < 64
    for a, b in zip(s32, s16):
        assert torch.equal(a["positions"], b["positions"])
        assert b["logits_cfg"].dtype == torch.float32  # mixed and drawn in fp32
        scale = a["logits_cond"].abs().max()
        diff = (a["logits_cond"] - b["logits_cond"]).abs()
        assert diff.max() < 0.1 * scale and diff.mean() < 0.02 * scale  # bf16 rounding, not a bug
    agree = (c16 == c32).float().mean()
    assert agree > 0.6, f"greedy tokens agree on only {agree:.0%}"


def test_sample_file_names_carry_draw_and_precision_only_when_not_default():
    from experiments.sample import knob_name

    m = make_module("randar")
    default = knob_name(m, m.sample_settings(), 0, 8)
    assert default.endswith("_official_seed0_n8")  # the names sample sets had before these knobs existed
    assert knob_name(m, m.sample_settings(precision="bf16"), 0, 8).endswith("_official_bf16_seed0_n8")
    assert "_inverse_cdf_bf16_" in knob_name(m, m.sample_settings(precision="bf16", draw="inverse_cdf"), 0, 8)
