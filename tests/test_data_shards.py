"""ImageFolder -> WebDataset shard writer: layout, manifest counts, determinism, resume, read-back."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules.images import ImageShardDataModule
from datamodules.shards import write_image_folder_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["n02", "n01", "n10"]  # written unsorted: the index must follow sorted folder order


def _save(path, value, fmt):
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture()
def image_folder(tmp_path):
    """3 classes x 5 images: JPEGs, one PNG (re-encoded), one garbage .png (skipped by the writer)."""
    src = tmp_path / "src"
    for c, cls in enumerate(CLASSES):
        os.makedirs(src / cls)
        for i in range(5):
            _save(src / cls / f"{cls}_{i}.JPEG", 30 * c + i, "JPEG")
        (src / cls / "notes.txt").write_text("not an image")
    os.remove(src / "n10" / "n10_4.JPEG")
    _save(src / "n10" / "n10_4.png", 99, "PNG")
    (src / "n01" / "broken.png").write_bytes(b"garbage")
    return str(src)


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_layout_manifest_and_classes(image_folder, tmp_path):
    out = str(tmp_path / "out")
    m = write_image_folder_shards(image_folder, out, "train", max_count=4)
    with open(os.path.join(out, "classes.json")) as f:
        assert json.load(f) == {"n01": 0, "n02": 1, "n10": 2}
    with open(os.path.join(out, "train-manifest.json")) as f:
        assert json.load(f) == m
    # 16 planned files (15 images + broken.png) -> 4 shards of 4; broken.png dropped from shard 0
    assert list(m["shards"]) == [f"train-{i:06d}.tar" for i in range(4)]
    assert list(m["shards"].values()) == [3, 4, 4, 4] and m["num_samples"] == 15
    assert len(m["skipped_files"]) == 1 and "broken.png" in m["skipped_files"][0]
    for name, count in m["shards"].items():
        files = members(os.path.join(out, name))
        assert len(files) == 2 * count and os.path.exists(os.path.join(out, name + ".done"))
    first = members(os.path.join(out, "train-000000.tar"))
    with open(os.path.join(image_folder, "n01", "n01_0.JPEG"), "rb") as f:
        assert first["n01_0.jpg"] == f.read()  # JPEG bytes kept verbatim
    assert first["n01_0.cls"] == b"0"
    last = members(os.path.join(out, "train-000003.tar"))
    assert last["n10_4.jpg"][:3] == b"\xff\xd8\xff" and last["n10_4.cls"] == b"2"  # PNG re-encoded as JPEG


def test_read_back_through_datamodule(image_folder, tmp_path):
    out = str(tmp_path / "out")
    write_image_folder_shards(image_folder, out, "val", max_count=4)
    pattern = os.path.join(out, "val-{000000..000003}.tar")
    dm = ImageShardDataModule(pattern, val_shards=pattern, batch_size=8, num_workers=0, image_size=8)
    labels = {k: lab for b in dm.val_dataloader() for k, lab in zip(b["_key"], b["label"].tolist())}
    assert len(labels) == 15 and dm.skipped_total() == 0
    assert all(labels[k] == ["n01", "n02", "n10"].index(k.split("_")[0]) for k in labels)
    assert dm.samples_per_epoch == 15  # from val-manifest.json


def test_max_size_cuts_shards(image_folder, tmp_path):
    m = write_image_folder_shards(image_folder, str(tmp_path / "o"), "train", max_count=1000, max_size=3000)
    assert max(m["shards"].values()) <= 2 and m["num_samples"] == 15


def test_parallel_is_deterministic_and_resume_skips_done(image_folder, tmp_path, capfd):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    write_image_folder_shards(image_folder, one, "train", max_count=3, workers=1)
    write_image_folder_shards(image_folder, two, "train", max_count=3, workers=2)
    names = sorted(n for n in os.listdir(one) if n.endswith(".tar"))
    assert len(names) == 6 and names == sorted(n for n in os.listdir(two) if n.endswith(".tar"))
    for n in names:  # byte-identical: same plan, mtime 0, no owner
        assert open(os.path.join(one, n), "rb").read() == open(os.path.join(two, n), "rb").read()
    # simulate a crash: shard 4 half-written (only its .tmp exists), shard 2 finished but marker lost
    os.remove(os.path.join(two, "train-000004.tar"))
    os.remove(os.path.join(two, "train-000004.tar.done"))
    with open(os.path.join(two, "train-000004.tar.tmp"), "wb") as f:
        f.write(b"partial")
    os.remove(os.path.join(two, "train-000002.tar.done"))
    untouched = os.path.getmtime(os.path.join(two, "train-000000.tar"))
    capfd.readouterr()
    m = write_image_folder_shards(image_folder, two, "train", max_count=3, workers=2)
    out = capfd.readouterr().out
    assert "wrote train-000004.tar" in out and "wrote train-000002.tar" in out and "wrote train-000000" not in out
    assert "6 shards (2 written, 4 already done)" in out
    assert os.path.getmtime(os.path.join(two, "train-000000.tar")) == untouched
    assert not os.path.exists(os.path.join(two, "train-000004.tar.tmp"))
    for n in names:
        assert open(os.path.join(one, n), "rb").read() == open(os.path.join(two, n), "rb").read()
    assert m["num_samples"] == 15


def test_changed_plan_rewrites(image_folder, tmp_path, capsys):
    out = str(tmp_path / "o")
    write_image_folder_shards(image_folder, out, "train", max_count=3)
    capsys.readouterr()
    write_image_folder_shards(image_folder, out, "train", max_count=4)
    assert "4 shards (4 written, 0 already done)" in capsys.readouterr().out
    with open(os.path.join(out, "train-manifest.json")) as f:
        assert len(json.load(f)["shards"]) == 4


def test_cli_and_errors(image_folder, tmp_path):
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "datamodules.shards", "--src", image_folder, "--out", out, "--max-count", "8"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(out, "train-manifest.json"))
    os.makedirs(os.path.join(image_folder, "n99"))  # another class set: classes.json would disagree
    bad = subprocess.run(cmd + ["--split", "val"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "classes.json" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = subprocess.run(cmd[:4] + ["/nonexistent/src", "--out", out], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "/nonexistent/src" in missing.stderr
