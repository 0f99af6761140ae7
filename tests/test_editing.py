"""Zero-shot tasks: edits keep every known token and generate every unknown position exactly once; resolution
extrapolation yields the 2x grid, keeps the hierarchical first phase and restores the model afterwards."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import make_module
from lightning_modules.variants import variant_names
from lightning_modules.editing import (class_edit, inpaint, mask_to_grid, outpaint, region_mask, sees_all_known)
from lightning_modules.extrapolation import (extrapolate, hierarchical_order, larger_grid, ntk_mixed_angles,
                                             rope_frequencies)
from lightning_modules.nn.rope import rope_2d_angles

GRID = (4, 4)


def run_task(m, task, region, seed=0):
    codes = torch.randint(0, 11, (3, *GRID), generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([0, 1, 2])
    records = []
    fn = {"inpaint": inpaint, "outpaint": outpaint, "edit": class_edit}[task]
    out = fn(m, codes, region, labels if task != "edit" else labels.flip(0), None,
             torch.Generator().manual_seed(seed), records.append)
    positions = torch.cat([r["positions"] for r in records], 1)  # [B, decoded]
    return codes, out, positions


@pytest.mark.parametrize("variant", variant_names())
@pytest.mark.parametrize("task,region", [("inpaint", "center"), ("outpaint", "center"), ("edit", "left"),
                                         ("inpaint", "box:1,0,3,2"), ("outpaint", "bottom")])
def test_edits_keep_known_and_generate_unknown_once(variant, task, region):
    m = make_module(variant, grid=GRID)
    inside = region_mask(region, GRID)
    known = inside if task == "outpaint" else ~inside
    codes, out, positions = run_task(m, task, region)
    assert out.shape == codes.shape
    assert torch.equal(out[:, known], codes[:, known])  # every known token exactly
    unknown = (~known).flatten().nonzero().flatten()
    for b in range(3):
        decoded = positions[b].tolist()
        for p in unknown.tolist():
            assert decoded.count(p) == 1  # every unknown position generated exactly once
        if m.ordering.capabilities.any_order:  # known tokens are prefilled, never decoded
            assert sorted(decoded) == unknown.tolist()
        else:  # a fixed order walks every position; the loop keeps the known ones
            assert decoded == m.ordering.decode_plan(1, 16, "one_per_step", None).order[0].tolist()


def test_edit_changes_only_the_region_and_depends_on_the_class():
    m = make_module("randar", grid=GRID)
    codes = torch.randint(0, 11, (1, *GRID), generator=torch.Generator().manual_seed(5))
    rec_a, rec_b = [], []
    a = class_edit(m, codes, "center", torch.tensor([0]), generator=torch.Generator().manual_seed(0),
                   recorder=rec_a.append)
    b = class_edit(m, codes, "center", torch.tensor([3]), generator=torch.Generator().manual_seed(0),
                   recorder=rec_b.append)
    inside = region_mask("center", GRID)
    assert torch.equal(a[:, ~inside], b[:, ~inside])
    # same order and context, another class: the predicted distribution over the region changes
    assert torch.equal(rec_a[0]["positions"], rec_b[0]["positions"])
    assert not torch.allclose(rec_a[0]["logits_cond"], rec_b[0]["logits_cond"])


def test_sees_all_known_per_ordering():
    assert sees_all_known(make_module("randar")) and sees_all_known(make_module("arpg"))
    assert not sees_all_known(make_module("raster")) and not sees_all_known(make_module("rar"))
    # (test_orderings.py checks that every ordering's declared any_order matches what its decode plan does)


def test_regions_and_masks():
    assert region_mask("center", (8, 8)).nonzero().tolist() == [[r, c] for r in range(2, 6) for c in range(2, 6)]
    assert region_mask("left", (4, 4))[:, :2].all() and not region_mask("left", (4, 4))[:, 2:].any()
    assert region_mask("top", (4, 4))[:2].all() and not region_mask("top", (4, 4))[2:].any()
    assert torch.equal(region_mask("right", (4, 4)), ~region_mask("left", (4, 4)))
    assert torch.equal(region_mask("bottom", (4, 4)), ~region_mask("top", (4, 4)))
    assert region_mask("box:0,1,2,3", (4, 4)).sum() == 4
    for bad in ("middle", "box:1,2", "box:0,0,5,1", "box:2,2,2,3"):
        with pytest.raises(ValueError, match="--region"):
            region_mask(bad, (4, 4))
    pixels = torch.zeros(16, 16, dtype=torch.uint8)
    pixels[4:12, 0:8] = 255
    assert torch.equal(mask_to_grid(pixels, (4, 4)), region_mask("box:1,0,3,2", (4, 4)))


# ------------------------------------------------------------------------------------------- extrapolation
@pytest.mark.parametrize("variant", ["randar", "arpg"])
def test_extrapolation_doubles_the_grid_and_keeps_the_first_phase(variant):
    m = make_module(variant, grid=GRID)
    low_records, records = [], []
    out = extrapolate(m, torch.tensor([0, 3]), m.sample_settings(), torch.Generator().manual_seed(0),
                      recorder=records.append, low_recorder=low_records.append)
    assert out["codes"].shape == (2, 8, 8)
    assert torch.equal(out["codes"][:, ::2, ::2], out["low"])  # (2i, 2j) keep the native pass exactly
    first = out["order"][:, :16]
    assert (((first // 8) % 2 == 0) & ((first % 8) % 2 == 0)).all()
    # pass 2 decodes exactly the other 48 positions, each once
    decoded = torch.cat([r["positions"] for r in records], 1)
    rest = [p for p in range(64) if not ((p // 8) % 2 == 0 and (p % 8) % 2 == 0)]
    assert torch.equal(decoded.sort(1).values, torch.tensor(rest).expand(2, -1))
    # pass 1 ran at the native grid in the hierarchical order mapped to (i, j)
    native = torch.cat([r["positions"] for r in low_records], 1)
    assert torch.equal((native // 4) * 16 + (native % 4) * 2, first)
    assert m.grid == GRID and m.backbone.num_positions == 16 and m.backbone.rope.table.shape[0] == 17


def test_larger_grid_restores_everything_after_an_error():
    m = make_module("randar", grid=GRID)
    table = m.backbone.rope.table.clone()
    angles = ntk_mixed_angles(GRID, rope_frequencies(m.backbone.rope))
    with pytest.raises(RuntimeError, match="boom"):
        with larger_grid(m, (8, 8), angles):
            assert m.num_positions == 64 and m.backbone.num_positions == 64
            assert m.backbone.rope.table.shape[0] == 65
            assert m.ordering.cache_length(m.backbone.num_positions) == 129  # the KV cache of generate() grows with it
            raise RuntimeError("boom")
    assert m.grid == GRID and m.backbone.grid == GRID and m.backbone.num_positions == 16
    assert torch.equal(m.backbone.rope.table, table)


def test_mixed_rope_table():
    m = make_module("randar", grid=GRID)
    freqs = rope_frequencies(m.backbone.rope)  # head_dim 16 -> 4 frequencies per axis
    assert torch.allclose(freqs, 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), atol=1e-6)
    # every frequency extrapolated = the plain table of the big grid
    assert torch.allclose(ntk_mixed_angles(GRID, freqs, ntk_boundary=4), rope_2d_angles(8, 8, 16), atol=1e-5)
    mixed = ntk_mixed_angles(GRID, freqs, ntk_boundary=2).view(8, 8, 8)  # [row, col, row 4 | col 4 angles]
    inter = torch.linspace(0, 3, 8)
    assert torch.allclose(mixed[5, 0, :2], 5 * freqs[:2])  # high frequencies: extrapolated row 5
    assert torch.allclose(mixed[5, 0, 2:4], inter[5] * freqs[2:])  # low frequencies: interpolated
    assert torch.allclose(mixed[0, 7, 6:], inter[7] * freqs[2:])
    with larger_grid(m, (8, 8), mixed.view(64, 8)):
        assert torch.equal(m.backbone.rope.table[0], torch.zeros(8, 2))  # the class row stays zero


def test_hierarchical_order_is_a_permutation():
    big, native = hierarchical_order((3, 5), 4, torch.Generator().manual_seed(0))
    assert torch.equal(big.sort(1).values, torch.arange(60).expand(4, -1))
    assert torch.equal(native.sort(1).values, torch.arange(15).expand(4, -1))


def test_extrapolation_refuses_raster_order_and_absolute_tables():
    with pytest.raises(ValueError, match="raster decodes in its own fixed order"):
        extrapolate(make_module("raster"), torch.tensor([0]))
    with pytest.raises(ValueError, match="target-aware"):
        extrapolate(make_module("rar"), torch.tensor([0]))
    with pytest.raises(ValueError, match="absolute"):
        extrapolate(make_module("raster", flavour="rar_vit"), torch.tensor([0]))


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def pixel_ckpt(tmp_path):
    """A RandAR generator on the 8x8 digits' pixel tokenizer, saved as a Lightning-style checkpoint."""
    from lightning_modules.variants import build_module

    model = dict(variant="randar", flavour="llama", size="debug", num_classes=10, grid=[8, 8], class_dropout=0.0,
                 backbone={"token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0})
    m = build_module(model, {"build": {"kind": "pixel", "levels": 17}}, optim={}, max_steps=10)
    path = os.path.join(tmp_path, "gen.ckpt")
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "roar": {"tokenizer_fingerprint": m.tokenizer_fingerprint, "vocab_size": 17}}, path)
    return path


@pytest.mark.parametrize("task", ["inpaint", "edit", "extrapolate"])
def test_edit_cli_writes_the_pictures(tmp_path, pixel_ckpt, task):
    from PIL import Image

    from experiments.edit import main

    out = os.path.join(tmp_path, task)
    args = ["--ckpt", pixel_ckpt, "--task", task, "--from-dataset", "0", "--region", "center", "--class", "3",
            "--out", out, "sample.num_steps=4"]
    assert main(args) == 0
    for name in ("input", "mask", "result", "side_by_side", "order_map"):
        assert os.path.isfile(os.path.join(out, f"{name}.png"))
    side = 16 if task == "extrapolate" else 8
    assert Image.open(os.path.join(out, "result.png")).size == (side, side)
    if task != "extrapolate":  # the kept pixels are the input's
        import numpy as np

        inp, res = (np.array(Image.open(os.path.join(out, f"{n}.png"))) for n in ("input", "result"))
        keep = ~region_mask("center", (8, 8)).numpy()
        assert (inp[keep] == res[keep]).all()
