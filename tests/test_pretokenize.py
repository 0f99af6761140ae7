"""Pre-tokenization: ADM crop, code shards equal direct encoding, manifest, ten-crop, corrupt samples, ranks."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.digits import digits_arrays
from lightning_modules.official.checkpoint_io import save_tokenizer
from tokenizers.pretokenize import adm_center_crop, expand_shards, main, merge_parts, to_tensor
from tokenizers.vq import LlamaGenVQ

SIZE = 16  # digits preset: f = 4 -> 4x4 codes


pytestmark = pytest.mark.usefixtures("one_thread")


def digit_image(i: int, rgb: bool) -> Image.Image:
    """A real digit, upscaled to a non-square size so that the crop matters."""
    images, _ = digits_arrays("val", 0)
    img = Image.fromarray(images[i]).resize((40 + i, 36), Image.BILINEAR)
    if rgb:
        arr = np.array(img)
        img = Image.fromarray(np.stack([arr, 255 - arr, arr // 2], -1).astype(np.uint8))
    return img


def encode_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretok")
    src = {}
    for s in range(3):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as w:
            for i in range(3):
                n = 3 * s + i
                rgb = n % 2 == 1
                fmt, ext = ("JPEG", "jpg") if n % 3 == 2 else ("PNG", "png")
                data = encode_bytes(digit_image(n, rgb), fmt)
                src[f"s{s}_{i}"] = (Image.open(io.BytesIO(data)).convert("RGB"), n % 10)
                w.write({"__key__": f"s{s}_{i}", ext: data, "cls": str(n % 10).encode()})
            if s == 0:  # corrupt image and unparsable label: skipped and counted
                w.write({"__key__": "bad_img", "png": b"\x89PNG broken", "cls": b"1"})
                w.write({"__key__": "bad_cls", "png": encode_bytes(digit_image(0, False), "PNG"), "cls": b"x"})
    torch.manual_seed(0)
    tok = LlamaGenVQ.from_preset("digits").eval()
    weights, _ = save_tokenizer(tok, str(root / "tok"), kind="llamagen_vq")
    return root, src, tok, weights


def read_codes(out: str) -> dict:
    samples = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            for s in wds.WebDataset(os.path.join(out, name), shardshuffle=False, empty_check=False):
                samples[s["__key__"]] = (np.load(io.BytesIO(s["codes.npy"])), int(s["cls"].decode("ascii")), name)
    return samples


def test_adm_center_crop_box_halving_then_bicubic():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (70, 130, 3), dtype=np.uint8))  # W 130, H 70
    out = adm_center_crop(img, 16)
    assert out.size == (16, 16)
    # reference steps: 70 >= 32 -> BOX to (65, 35); 35 >= 32 -> (32, 17); bicubic to (30, 16); crop x 7..23
    ref = img.resize((65, 35), Image.BOX).resize((32, 17), Image.BOX).resize((30, 16), Image.BICUBIC)
    assert np.array_equal(np.array(out), np.array(ref)[0:16, 7:23])
    small = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))  # no halving, upscale short side
    ref = np.array(small.resize((38, 32), Image.BICUBIC))[:, 3:35]
    assert np.array_equal(np.array(adm_center_crop(small, 32)), ref)


def test_code_shards_equal_direct_encoding(setup, tmp_path):
    root, src, tok, weights = setup
    out = str(tmp_path / "codes")
    manifest = main(["--shards", str(root / "train-{000000..000002}.tar"), "--out", out,
                     "--tokenizer-kind", "llamagen_vq", "--tokenizer-path", weights, "--image-size", str(SIZE),
                     "--batch-size", "4", "--maxcount", "5"])
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["num_samples"] == 9 and on_disk["skipped"] == 2
    assert on_disk["shards"] == {"codes-000000.tar": 5, "codes-000001.tar": 4}
    assert on_disk["tokenizer"] == {"kind": "llamagen_vq", "fingerprint": tok.fingerprint,
                                    "config": tok.config(), "vocab_size": 128}
    assert on_disk["grid"] == [4, 4] and on_disk["crop_policy"] == "adm_flip" and on_disk["num_variants"] == 2
    samples = read_codes(out)
    assert set(samples) == set(src)
    for key, (codes, label, shard) in samples.items():
        img, want_label = src[key]
        crop = adm_center_crop(img, SIZE)
        direct = tok.encode(torch.stack([to_tensor(crop), to_tensor(crop.transpose(Image.FLIP_LEFT_RIGHT))]))
        assert codes.dtype == np.int16 and codes.shape == (2, 4, 4)
        assert np.array_equal(codes, direct.numpy()) and label == want_label
    with tarfile.open(os.path.join(out, "codes-000000.tar")) as tf:  # member names: {key}.codes.npy, {key}.cls
        names = tf.getnames()
    assert "s0_0.codes.npy" in names and "s0_0.cls" in names


def test_ten_crop_variants(setup, tmp_path):
    root, src, tok, weights = setup
    out = str(tmp_path / "ten")
    main(["--shards", str(root / "train-000001.tar"), "--out", out, "--tokenizer-kind", "digits_vq",
          "--tokenizer-path", weights, "--image-size", str(SIZE), "--ten-crop"])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["crop_policy"] == "ten_crop" and manifest["num_variants"] == 10 and manifest["skipped"] == 0
    codes, _, _ = read_codes(out)["s1_0"]
    assert codes.shape == (10, 4, 4)
    big = adm_center_crop(src["s1_0"][0], int(SIZE * 1.1))  # 17 px
    top_left = big.crop((0, 0, SIZE, SIZE))
    centre_flipped = big.transpose(Image.FLIP_LEFT_RIGHT).crop((0, 0, 17, 17)).crop((0, 0, SIZE, SIZE))
    direct = tok.encode(torch.stack([to_tensor(top_left), to_tensor(centre_flipped)]))
    assert np.array_equal(codes[0], direct[0].numpy())  # variant 0: top-left corner
    assert np.array_equal(codes[5], direct[1].numpy())  # variant 5: top-left corner of the flipped crop


def test_ranks_split_shards_and_merge(setup, tmp_path, monkeypatch):
    root, src, tok, weights = setup
    out = str(tmp_path / "dist")
    args = ["--shards", str(root / "train-{000000..000002}.tar"), "--out", out, "--tokenizer-kind", "llamagen_vq",
            "--tokenizer-path", weights, "--image-size", str(SIZE), "--merge-timeout", "0"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    part1 = main(args)  # rank 1 from the environment: input shard 1 only
    assert part1["input_shards"] == [str(root / "train-000001.tar")] and part1["num_samples"] == 3
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    merged = main(args + ["--rank", "0", "--world-size", "2"])  # shards 0 and 2, then merges both parts
    assert merged["num_samples"] == 9 and merged["skipped"] == 2
    assert merged["shards"] == {"codes-r0-000000.tar": 6, "codes-r1-000000.tar": 3}
    assert set(read_codes(out)) == set(src)
    assert json.load(open(os.path.join(out, "manifest.json")))["shards"] == merged["shards"]
    assert main(["--merge", "--out", out])["num_samples"] == 9  # the explicit merge step gives the same
    bad = dict(merged, rank=1, tokenizer={**merged["tokenizer"], "fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="fingerprint"):
        merge_parts([dict(merged, rank=0), bad])


def test_bad_arguments_fail_clearly(setup, tmp_path):
    root, _, _, weights = setup
    with pytest.raises(FileNotFoundError, match="train-000009.tar"):
        expand_shards(str(root / "train-{000008..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        main(["--shards", str(root / "train-000000.tar"), "--out", str(tmp_path), "--tokenizer-kind",
              "llamagen_vq", "--tokenizer-path", str(tmp_path / "missing.safetensors"), "--image-size", "16"])
    with pytest.raises(ValueError, match="not divisible"):
        main(["--shards", str(root / "train-000000.tar"), "--out", str(tmp_path / "x"), "--tokenizer-kind",
              "llamagen_vq", "--tokenizer-path", weights, "--image-size", "18"])


def test_progress_lines_count_the_images_read(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROAR_PROGRESS", "lines")  # the non-TTY mode of lightning_modules/progress.py
    monkeypatch.setenv("ROAR_PROGRESS_EVERY_S", "0")
    root, _, _, weights = setup
    main(["--shards", str(root / "train-000001.tar"), "--out", str(tmp_path / "codes"), "--tokenizer-kind",
          "llamagen_vq", "--tokenizer-path", weights, "--image-size", str(SIZE)])
    err = capsys.readouterr().err
    assert "pretokenize rank 0/1: 1 images" in err and "pretokenize rank 0/1: 3 images" in err
