"""The checks of the own-images path, each on tiny inputs: train_tokenizer's settings are validated like the experiment
config; a flat val folder (ImageNet's layout) is sharded with its labels; model.num_classes comes from the data;
val codes are found and a run without val data says so once; extractors are refused on another domain or
resolution; the ImageNet presets validate on ImageNet."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, subprocess_env
from data_helpers import make_code_shards, make_shards

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ train_tokenizer settings
@pytest.mark.parametrize("sets,key", [
    (["data.train_shards=x/train-*.tar"], "data.train_shards"),  # the user report: accepted and ignored before
    (["data.foo=1"], "data.foo"), (["modle.lr=1"], "modle"), (["tokenizer.vq.foo=1"], "tokenizer.vq.foo"),
    (["train.lr=fast"], "train.lr"), (["train.disc_ndf=64"], "train.disc_ndf"), (["data.kind=folder"], "data.kind"),
    (["data.kind=shards"], "data.train_shards"), (["train.val_every_steps=10"], "train.val_every_steps"),
    (["train.extractor=inception"], "train.extractor_weights"), (["tokenizer.preset=huge"], "tokenizer.preset"),
])
def test_train_tokenizer_settings_are_one_line_errors(tmp_path, capsys, sets, key):
    from experiments.train_tokenizer import cli

    argv = ["--out", str(tmp_path / "out"), "-c", "experiments/configs/tokenizer/digits_vq.yaml"]
    assert cli(argv + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config {key}") and "\n" not in err, err
    assert not os.path.exists(tmp_path / "out")  # refused before any work


def test_tokenizer_readers_cover_every_key_and_presets_load():
    from omegaconf import OmegaConf

    from experiments.readers import TOKENIZER_READERS, config_leaves
    from experiments.tokenizer_config import TokenizerTrainConfig, load_tokenizer_config

    assert sorted(config_leaves(OmegaConf.structured(TokenizerTrainConfig))) == sorted(TOKENIZER_READERS)
    sets = ["data.train_shards=a-*.tar", "data.val_shards=b-*.tar", "train.extractor_weights=e.safetensors"]
    small = load_tokenizer_config("experiments/configs/tokenizer/small_vq.yaml", {}, sets +
                                  ["tokenizer.vq.encoder_ch_mult=[1,1,2]", "tokenizer.vq.decoder_ch_mult=[1,1,2]"])
    assert small["tokenizer"]["vq"]["encoder_ch_mult"] == [1, 1, 2] and small["data"]["image_size"] == 64
    vq16 = load_tokenizer_config("experiments/configs/tokenizer/vq16_256.yaml", {}, sets)
    assert vq16["tokenizer"]["preset"] == "vq16" and vq16["data"]["image_size"] == 256


# ------------------------------------------------------------------ a flat val folder (ImageNet)
SYNSETS = ["n01440764", "n01443537", "n01484850"]


def _flat_folder(root) -> dict[str, str]:
    os.makedirs(root, exist_ok=True)
    truth = {}
    for i in range(9):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(np.full((12, 10, 3), 20 * i, np.uint8)).save(os.path.join(root, name), format="JPEG")
        truth[name] = SYNSETS[(i * 2) % 3]
    return truth


def _shard_labels(out: str, split: str) -> dict[str, int]:
    from datamodules.shards import iter_tar_samples

    return {s["__key__"]: int(s["cls"]) for p in sorted(glob.glob(f"{out}/{split}-*.tar"))
            for s in iter_tar_samples(p, print)}


@pytest.mark.parametrize("fmt", ["two_column", "kaggle_csv", "index", "devkit"])
def test_flat_val_folder_with_labels(tmp_path, fmt):
    from scipy.io import savemat

    from datamodules.shards import main

    truth = _flat_folder(tmp_path / "val")
    train = tmp_path / "train"  # the train split first: its classes.json maps the synsets
    for k, syn in enumerate(SYNSETS):
        os.makedirs(train / syn)
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(train / syn / f"{syn}_{k}.JPEG", format="JPEG")
    out = str(tmp_path / "shards")
    assert main(["--src", str(train), "--out", out, "--split", "train"]) == 0
    names = sorted(truth)
    labels, extra = tmp_path / "labels.txt", []
    if fmt == "two_column":
        labels.write_text("".join(f"{n} {truth[n]}\n" for n in names))
    elif fmt == "kaggle_csv":
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"{os.path.splitext(n)[0]},{truth[n]} 1 2 3 4\n" for n in reversed(names)))
    elif fmt == "index":
        labels.write_text("".join(f"{n} {SYNSETS.index(truth[n])}\n" for n in names))
    else:  # devkit: ILSVRC2012_IDs in file order + meta.mat, with IDs deliberately not in synset order
        ids = {"n01440764": 3, "n01443537": 1, "n01484850": 2}
        labels.write_text("".join(f"{ids[truth[n]]}\n" for n in names))
        rec = np.array([(i, w) for w, i in ids.items()], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        savemat(tmp_path / "meta.mat", {"synsets": rec})
        extra = ["--devkit-meta", str(tmp_path / "meta.mat")]
    assert main(["--src", str(tmp_path / "val"), "--out", out, "--split", "val", "--labels", str(labels), *extra]) == 0
    got = _shard_labels(out, "val")
    assert got == {os.path.splitext(n)[0]: SYNSETS.index(truth[n]) for n in names}


def test_flat_folder_errors_are_one_line(tmp_path, capsys):
    from datamodules.shards import main

    truth = _flat_folder(tmp_path / "val")
    assert main(["--src", str(tmp_path / "val"), "--out", str(tmp_path / "o")]) == 2
    assert "needs --labels" in capsys.readouterr().err
    (tmp_path / "l.txt").write_text("".join(f"{n} {s}\n" for n, s in list(truth.items())[:-1]))
    assert main(["--src", str(tmp_path / "val"), "--out", str(tmp_path / "o"), "--labels", str(tmp_path / "l.txt")]) == 2
    assert "no label for 1 image(s)" in capsys.readouterr().err
    (tmp_path / "g.txt").write_text("1\n" * 9)
    assert main(["--src", str(tmp_path / "val"), "--out", str(tmp_path / "o"), "--labels", str(tmp_path / "g.txt")]) == 2
    assert "--devkit-meta" in capsys.readouterr().err


# ------------------------------------------------------------------ defaults from the data
def _image_shards(folder, classes: int) -> str:
    pattern = make_shards(str(folder), 1, 6, size=8)
    with open(os.path.join(folder, "classes.json"), "w") as f:
        json.dump({f"c{i}": i for i in range(classes)}, f)
    return pattern


def test_num_classes_comes_from_the_data_unless_set(tmp_path):
    from experiments.config import ConfigError, load_config

    pattern = _image_shards(tmp_path / "img", 7)
    base = ["data.kind=images", f"data.train_shards={pattern}", "data.image_size=8"]
    assert load_config(["experiments/configs/debug_raster.yaml"], base).model.num_classes == 7
    assert load_config([], base + ["model.num_classes=7"]).model.num_classes == 7
    with pytest.raises(ConfigError, match=r"model.num_classes: 10 is set, but the training data has 7 classes \(.*"
                                          r"classes.json\)"):
        load_config(["experiments/configs/demo/raster.yaml"], base)  # the demo preset says 10
    codes = make_code_shards(str(tmp_path / "codes" / "train"), 1, 4)
    manifest = json.load(open(tmp_path / "codes" / "train" / "manifest.json"))
    json.dump(dict(manifest, num_classes=5), open(tmp_path / "codes" / "train" / "manifest.json", "w"))
    cfg = load_config([], ["data.kind=codes", f"data.code_dir={tmp_path / 'codes'}", "tokenizer.kind=codes",
                           "tokenizer.vocab_size=16"])
    assert cfg.model.num_classes == 5 and codes


def test_code_dir_val_part_is_found_and_no_val_is_said_once(tmp_path):
    from experiments.config import load_config
    from experiments.data_defaults import code_shards, no_val_reason

    make_code_shards(str(tmp_path / "c" / "train"), 1, 4)
    args = ["data.kind=codes", f"data.code_dir={tmp_path / 'c'}", "tokenizer.kind=codes", "tokenizer.vocab_size=16"]
    cfg = load_config([], args)
    assert code_shards(cfg) == ([str(tmp_path / "c" / "train" / "codes-000000.tar")], None)
    assert "pretokenize --val-shards" in no_val_reason(cfg)
    make_code_shards(str(tmp_path / "c" / "val"), 1, 4)
    assert code_shards(cfg)[1] == [str(tmp_path / "c" / "val" / "codes-000000.tar")] and no_val_reason(cfg) is None


@pytest.mark.parametrize("preset", ["rar_B", "randar_L", "arpg_L", "llamagen_B"])
def test_imagenet_presets_validate_on_imagenet(tmp_path, preset):
    """Every ImageNet preset trains on codes and finds the val codes pretokenize --val-shards writes beside them."""
    from experiments.config import load_config
    from experiments.data_defaults import code_shards, no_val_reason

    for split in ("train", "val"):
        make_code_shards(str(tmp_path / split), 1, 2, grid=(16, 16))
    cfg = load_config([f"experiments/configs/{preset}.yaml"], [f"data.code_dir={tmp_path}"])
    assert cfg.data.kind == "codes" and no_val_reason(cfg) is None
    assert code_shards(cfg)[1] == [os.path.join(str(tmp_path), "val", "codes-000000.tar")]


@pytest.mark.slow
def test_a_run_without_val_data_says_so_once(tmp_path):
    pattern = _image_shards(tmp_path / "img", 10)
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "-c", "experiments/configs/debug_raster.yaml",
                           "data.kind=images", f"data.train_shards={pattern}", "data.image_size=8",
                           "trainer.max_steps=2", "trainer.global_batch_size=4", "callbacks.sample_every_steps=0",
                           f"out_dir={tmp_path / 'runs'}", "name=noval"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=subprocess_env(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("no validation data: data.val_shards is empty") == 1
    assert "val_dataloader" not in log and "PossibleUserWarning" not in log
    m = json.load(open(tmp_path / "runs" / "noval" / "metrics.json"))
    assert m["val_nll_bits"] is None and "data.val_shards is empty" in m["val_nll_note"]


# ------------------------------------------------------------------ extractors fit their data
@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """Two tiny colour 'datasets' at 16 px: photos (3 classes) and other (2 classes), with their classes.json."""
    from datamodules.shards import write_image_folder_shards

    root = tmp_path_factory.mktemp("dom")
    rng = np.random.default_rng(0)
    for name, classes in (("photos", 3), ("other", 2)):
        for split in ("train", "val"):
            for c in range(classes):
                folder = root / name / split / f"class{c}"
                os.makedirs(folder)
                for i in range(6):
                    arr = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8) + np.array([80 * c, 200 - 90 * c, 40],
                                                                                      np.uint8)
                    Image.fromarray(arr).save(folder / f"{i}.png")
            write_image_folder_shards(str(root / name / split), str(root / f"{name}_shards"), split)
    return root


def test_shard_extractor_is_deterministic_and_refuses_other_domains(photo_shards, tmp_path):
    from experiments.train_extractor import main
    from lightning_modules.metrics.extractors import load_extractor
    from lightning_modules.metrics.shard_extractor import check_domain

    pattern = str(photo_shards / "photos_shards" / "train-*.tar")
    args = ["--shards", pattern, "--val-shards", pattern.replace("train-", "val-"), "--image-size", "16",
            "--epochs", "3"]
    a = main(args + ["--out", str(tmp_path / "a.safetensors")])
    b = main(args + ["--out", str(tmp_path / "b.safetensors")])
    assert a["name"] == b["name"] and a["domain"]["image_size"] == 16 and len(a["domain"]["classes"]) == 3
    ext = load_extractor("shards", str(tmp_path / "a.safetensors"))
    check_domain(ext, 16, str(photo_shards / "photos_shards" / "val-*.tar"))  # its own data: fine
    with pytest.raises(ValueError, match="trained on 16 px images.*the samples are 32 px"):
        check_domain(ext, 32, str(photo_shards / "photos_shards" / "val-*.tar"))
    with pytest.raises(ValueError, match="is another dataset"):
        check_domain(ext, 16, str(photo_shards / "other_shards" / "val-*.tar"))
    with pytest.raises(ValueError, match="not on the embedded digits"):
        check_domain(ext, 16, "digits")
    with pytest.raises(ValueError, match="not a digits extractor.*use --extractor shards"):
        load_extractor("digits", str(tmp_path / "a.safetensors"))


def test_evaluate_refuses_the_digits_cnn_on_photos(photo_shards, tmp_path, capsys):
    from experiments.evaluate import cli
    from lightning_modules.metrics.extractors import DigitsCNN, save_digits_extractor

    digits = str(tmp_path / "digits.safetensors")  # untrained: the refusal reads the kind, not the weights
    save_digits_extractor(DigitsCNN(), digits, {})
    colour = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=colour)
    ref = str(photo_shards / "photos_shards" / "val-*.tar")
    for r in (ref, "digits"):  # against the photos' shards, or against the digits with colour samples
        assert cli(["--samples", str(tmp_path / "s.npz"), "--ref", r, "--extractor", "digits",
                    "--extractor-weights", digits, "--cache-dir", ""]) == 2
        err = capsys.readouterr().err.strip()
        assert "digits CNN" in err and "\n" not in err, err


def test_fid_callback_refuses_a_mismatched_extractor_at_config_time(photo_shards, tmp_path):
    from experiments.config import ConfigError, load_config
    from experiments.fid_setup import fid_callback
    from experiments.train_extractor import main

    pattern = str(photo_shards / "photos_shards" / "train-*.tar")
    main(["--shards", pattern, "--image-size", "16", "--epochs", "1", "--out", str(tmp_path / "e.safetensors")])
    base = ["data.kind=images", f"data.train_shards={pattern}", "eval.fid_num_samples=6", "eval.extractor=shards",
            f"eval.extractor_weights={tmp_path / 'e.safetensors'}"]
    ok = load_config(["experiments/configs/debug_raster.yaml"], base + [
        "data.image_size=16", f"data.val_shards={pattern.replace('train-', 'val-')}"])
    assert ok.model.num_classes == 3 and fid_callback(ok, str(tmp_path)) is not None
    bad = load_config(["experiments/configs/debug_raster.yaml"], base + [
        "data.image_size=32", f"data.val_shards={pattern.replace('train-', 'val-')}"])
    with pytest.raises(ConfigError, match="eval.extractor_weights: .*16 px"):
        fid_callback(bad, str(tmp_path))
