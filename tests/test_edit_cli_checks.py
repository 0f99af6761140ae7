"""`experiments.edit` as users run it: a region that leaves nothing to generate and bad sampling values are one line
(exit 2), extrapolate from a dataset sample takes its label, and order maps show kept tokens as known ("k", -1)
for every ordering, fixed-order ones included, without changing a sampled token."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_module
from lightning_modules.variants import variant_names


def save_ckpt(path, variant: str) -> str:
    from lightning_modules.variants import build_module

    model = dict(variant=variant, flavour="llama", size="debug", num_classes=10, grid=[8, 8], class_dropout=0.0)
    torch.manual_seed(0)
    m = build_module(model, {"build": {"kind": "pixel", "levels": 17}}, optim={}, max_steps=10)
    with torch.no_grad():  # a fresh init barely reads the class: give it weights whose samples depend on it
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
                "roar": {"tokenizer_fingerprint": m.tokenizer_fingerprint, "vocab_size": 17}}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {v: save_ckpt(d / f"{v}.ckpt", v) for v in ("randar", "arpg", "raster")}


def refused(capfd, args) -> str:
    from experiments.edit import main

    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cpu", *args])
    err = capfd.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err, err
    return err


def test_a_region_leaving_nothing_to_generate_is_one_line(tmp_path, capfd, ckpts):
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(black)
    common = ["--ckpt", ckpts["randar"], "--from-dataset", "3", "--out", str(tmp_path / "x")]
    err = refused(capfd, [*common, "--task", "outpaint", "--region", "box:0,0,8,8"])
    assert err.startswith("error: --region box:0,0,8,8:") and "nothing is left to generate" in err
    for task in ("inpaint", "edit"):
        err = refused(capfd, [*common, "--task", task, "--mask", str(black), "--class", "1"])
        assert err.startswith(f"error: --mask {black}:") and "nothing is left to generate" in err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("bad", ["sample.top_p=-0.5", "sample.temperature=0", "sample.top_k=-5"])
def test_bad_sampling_value_is_one_line(tmp_path, capfd, ckpts, bad):
    err = refused(capfd, ["--ckpt", ckpts["randar"], "--task", "inpaint", "--from-dataset", "3",
                          "--out", str(tmp_path / "x"), bad])
    assert err.startswith(f"error: {bad.split('=')[0]}:"), err


def test_extrapolate_from_a_dataset_sample_generates_its_class(tmp_path, capfd, ckpts):
    from experiments.edit import dataset_image, main

    label = dataset_image(3)[1]
    run = {}
    for name, extra in (("dataset", ["--from-dataset", "3"]), ("class", ["--class", str(label)]), ("null", [])):
        out = tmp_path / name
        assert main(["--device", "cpu", "--ckpt", ckpts["arpg"], "--task", "extrapolate", *extra, "--out", str(out),
                     "sample.num_steps=4", "--high-steps", "4"]) == 0
        run[name] = np.array(Image.open(out / "result.png"))
    assert np.array_equal(run["dataset"], run["class"]) and not np.array_equal(run["dataset"], run["null"])
    assert f"class {label}" in capfd.readouterr().out  # and the log says where the class came from
    err = refused(capfd, ["--ckpt", ckpts["arpg"], "--task", "extrapolate", "--image", str(tmp_path / "null" /
                                                                                            "result.png"),
                          "--out", str(tmp_path / "y")])
    assert err.startswith("error: --image:"), err


@pytest.mark.parametrize("variant", variant_names())
def test_order_map_marks_kept_tokens_known_and_sampling_is_unchanged(variant):
    from lightning_modules.callbacks.order_map import OrderRecorder, step_map
    from lightning_modules.editing import class_edit, region_mask

    m = make_module(variant, grid=(4, 4))
    codes = torch.randint(0, 11, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    region = region_mask("center", (4, 4))
    rec = OrderRecorder()
    out = class_edit(m, codes, region, torch.tensor([1, 2]), None, torch.Generator().manual_seed(0), rec)
    plain = class_edit(m, codes, region, torch.tensor([1, 2]), None, torch.Generator().manual_seed(0))
    assert torch.equal(out, plain)  # recording changes no token
    maps = step_map(rec.positions, (4, 4), rec.kept)
    assert (maps[:, ~region] == -1).all() and (maps[:, region] >= 0).all()


def test_edit_cli_order_map_of_a_raster_model_has_no_steps_on_kept_cells(tmp_path, ckpts):
    from experiments.edit import run_edit
    from experiments.checkpoints import load_generator
    from lightning_modules.editing import region_mask

    m = load_generator(ckpts["raster"])
    image = torch.from_numpy(np.full((1, 3, 8, 8), 200, np.uint8))
    region = region_mask("center", (8, 8))
    out = run_edit(m, "edit", image, 5, region, str(tmp_path))
    assert torch.equal(out["steps"][0] >= 0, region)  # what order_map.png draws: steps inside, "k" outside
    assert os.path.isfile(tmp_path / "order_map.png")
