"""Generation-order pictures: the map holds the recorded step of every position, the reveal frames follow the
steps, the GIF and PNG are written, and the callback logs order/map and order/reveal to TensorBoard."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import make_module
from lightning_modules.callbacks.order_map import (GREY, OrderMap, OrderRecorder, render_order_map, reveal_frames,
                                                   save_gif, step_map, write_order_pictures)
from lightning_modules.sampling import generate
from lightning_modules.variants import variant_names


def sample_recorded(variant, known=None, steps=None):
    m = make_module(variant, grid=(4, 4))
    rec = OrderRecorder()
    settings = m.sample_settings(num_steps=steps)
    codes = generate(m, torch.tensor([0, 1]), settings, torch.Generator().manual_seed(0), known=known, recorder=rec)
    return m, codes, rec


@pytest.mark.parametrize("variant", variant_names())
def test_map_values_equal_the_recorded_step(variant):
    m, _, rec = sample_recorded(variant)
    maps = step_map(rec.positions, (4, 4))
    assert maps.shape == (2, 4, 4)
    flat = maps.view(2, -1)
    for t, pos in enumerate(rec.positions):
        assert (torch.gather(flat, 1, pos) == t).all()  # every position decoded at step t reads t
    assert (flat >= 0).all()  # nothing known: every position has a step
    if variant in ("raster", "rar"):  # the raster baseline and RAR (scan=raster) decode in raster order
        assert torch.equal(flat[0], torch.arange(16))


def test_known_positions_read_minus_one():
    known = torch.zeros(16, dtype=torch.bool)
    known[[0, 5, 10]] = True
    tokens = torch.randint(0, 11, (2, 16))
    _, _, rec = sample_recorded("randar", known=(known, tokens), steps=5)
    maps = step_map(rec.positions, (4, 4)).view(2, -1)
    assert (maps[:, known] == -1).all() and (maps[:, ~known] >= 0).all()
    assert int(maps.max()) == 4


def test_reveal_frames_follow_the_steps():
    m, codes, rec = sample_recorded("arpg", steps=4)
    frames = reveal_frames(m.tokenizer, rec, (4, 4))
    assert len(frames) == len(rec.positions) + 1
    assert (frames[0] == GREY).all()  # nothing decoded yet
    final = m.tokenizer.decode(codes.view(2, 4, 4))
    assert torch.equal(frames[-1], final)  # everything revealed = the sample
    # after step 0 exactly the step-0 positions are revealed (codes tokenizer: 1 pixel per token)
    shown = (frames[1] != GREY).any(1).view(2, -1)
    first = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, rec.positions[0], True)
    assert torch.equal(shown & ~first, torch.zeros_like(shown))


def test_pictures_and_gif_are_written(tmp_path):
    m = make_module("randar", grid=(4, 4))
    out = write_order_pictures(m, torch.tensor([0, 1, 2]), 0, os.path.join(tmp_path, "x_"), num_steps=5)
    assert out["map"].dtype == torch.uint8 and out["map"].shape[0] == 3
    png, gif = Image.open(out["map_png"]), Image.open(out["gif"])
    assert png.size == (out["map"].shape[2], out["map"].shape[1])
    assert gif.n_frames == 6  # the empty canvas + 5 steps
    assert render_order_map(torch.arange(256).view(1, 16, 16)).shape[0] == 3  # numbered up to 16x16
    with pytest.raises(Exception):
        save_gif([], os.path.join(tmp_path, "empty.gif"))


def test_callback_logs_every_n_steps_and_writes_files(tmp_path):
    m = make_module("arpg", grid=(4, 4))
    logged = []
    logger = SimpleNamespace(experiment=SimpleNamespace(add_image=lambda tag, img, global_step: logged.append(
        (tag, tuple(img.shape), global_step))))
    trainer = SimpleNamespace(global_step=0, global_rank=0, logger=logger, callbacks=[])
    cb = OrderMap(every_n_steps=2, labels=[0, 1], seed=0, out_dir=str(tmp_path), sample_kwargs={"num_steps": 4})
    for step in (1, 2, 3):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, m, None, None, 0)
    assert [(t, s) for t, _, s in logged] == [("order/map", 2), ("order/reveal", 2)]
    assert sorted(os.listdir(tmp_path)) == ["step_000002_map.png", "step_000002_reveal.gif"]
    cb.on_fit_end(trainer, m)  # the final step (3) is logged once more
    assert logged[-1][2] == 3 and len(logged) == 4


def test_build_adds_the_callback_when_configured(tmp_path):
    from experiments.build import build_callbacks
    from experiments.config import load_config

    cfg = load_config([], ["callbacks.order_map_every_steps=50", "callbacks.sample_every_steps=0"])
    callbacks = build_callbacks(cfg, str(tmp_path))
    maps = [c for c in callbacks if isinstance(c, OrderMap)]
    assert len(maps) == 1 and maps[0].every == 50 and maps[0].out_dir == os.path.join(str(tmp_path), "order")
    cfg = load_config([], ["callbacks.sample_every_steps=0"])
    assert not any(isinstance(c, OrderMap) for c in build_callbacks(cfg, str(tmp_path)))
