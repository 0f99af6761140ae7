"""Embedded digits shards: written once, read back through ImageShardDataModule exactly as the arrays."""
import json
import os
import subprocess
import sys

import pytest

from datamodules.digits import digits_arrays
from datamodules.embedded import embedded_shards, ensure_embedded
from datamodules.images import ImageShardDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    ensure_embedded(out, verbose=False)
    return out


def test_manifest_layout(digits_dir):
    with open(os.path.join(digits_dir, "manifest.json")) as f:
        m = json.load(f)
    assert m["dataset"] == "digits" and m["image_size"] == 8 and m["num_classes"] == 10
    for split in ("train", "val"):
        n = len(digits_arrays(split)[1])
        assert m["splits"][split]["num_samples"] == n == sum(m["splits"][split]["shards"].values())
        for name in m["splits"][split]["shards"]:
            assert name.startswith(f"{split}-") and os.path.isfile(os.path.join(digits_dir, name))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_round_trip_equals_arrays(digits_dir, num_workers):
    dm = ImageShardDataModule(embedded_shards(digits_dir, "train"), embedded_shards(digits_dir, "val"),
                              batch_size=64, num_workers=num_workers, image_size=8, center_crop="none",
                              random_flip=False, resampled=False)
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        images, labels = digits_arrays(split)  # [n, 8, 8] uint8, [n]
        seen = set()
        for batch in loader:
            assert tuple(batch["image"].shape[1:]) == (3, 8, 8)
            for key, img, label in zip(batch["_key"], batch["image"].numpy(), batch["label"].tolist()):
                i = int(key.split("_")[1])
                assert key.startswith(split) and key not in seen
                assert (img == images[i][None]).all() and label == labels[i]  # grey -> 3 equal channels
                seen.add(key)
        assert len(seen) == len(labels)
    assert dm.skipped_total() == 0


def test_idempotent_and_repairs(digits_dir, capsys):
    before = {n: os.path.getmtime(os.path.join(digits_dir, n)) for n in os.listdir(digits_dir)}
    ensure_embedded(digits_dir)
    assert "already complete" in capsys.readouterr().out
    assert before == {n: os.path.getmtime(os.path.join(digits_dir, n)) for n in os.listdir(digits_dir)}
    victim = os.path.join(digits_dir, "val-000001.tar")
    with open(victim, "r+b") as f:  # a half-copied shard: the set is incomplete and gets rewritten
        f.truncate(1000)
    ensure_embedded(digits_dir)
    assert "wrote" in capsys.readouterr().out and os.path.getsize(victim) % 512 == 0


def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "datamodules.embedded", "--out", str(tmp_path), "--seed", "1"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "wrote" in first.stdout and "already complete" in again.stdout and str(tmp_path) in again.stdout
    with open(os.path.join(str(tmp_path), "manifest.json")) as f:
        assert json.load(f)["seed"] == 1


def _ensure(out, queue):
    queue.put(ensure_embedded(out, verbose=False)["bytes"])


def test_concurrent_ranks_write_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # like DDP ranks all calling ensure_embedded at start-up
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == results[2]
    dm = ImageShardDataModule(embedded_shards(str(tmp_path), "val"), batch_size=100, num_workers=0, image_size=8)
    assert sum(len(b["_key"]) for b in dm.train_dataloader()) == 300 and dm.skipped_total() == 0
