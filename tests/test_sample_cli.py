"""`experiments.sample` as users run it: the README command on a default run, sharded sampling on 2 ranks that
resumes and merges without gathering, and the one sample-set protocol (the offline .npz scores the val/fid the run
logged)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, subprocess_env

ENV = subprocess_env(REPO, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
TRAIN = [sys.executable, "-m", "experiments.train", "-c", "experiments/configs/debug_raster.yaml",
         "trainer.max_steps=3", "trainer.val_every_steps=3", "trainer.limit_val_batches=1",
         "callbacks.sample_every_steps=0", "resume=never"]


def run(cmd, timeout=600, ok=True):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A default run (no EMA) and one with EMA and a logged FID of 20 samples (digits extractor)."""
    out = tmp_path_factory.mktemp("runs")
    ext = out / "digits.safetensors"
    run([sys.executable, "-m", "experiments.train_extractor", "--out", str(ext)])
    run([*TRAIN, f"out_dir={out}", "name=plain", f"data.root={out}/digits"])
    run([*TRAIN, f"out_dir={out}", "name=ema", f"data.root={out}/digits", "callbacks.ema_decay=0.5",
         "eval.fid_num_samples=20", f"eval.extractor_weights={ext}"])
    return out, ext


def sample(*args, ok=True, ranks=1, timeout=600):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks > 1 else [sys.executable])
    return run([*launcher, "-m", "experiments.sample", *args], timeout=timeout, ok=ok)


def npz_of(folder):
    (path,) = glob.glob(os.path.join(folder, "*.npz"))
    with np.load(path) as z:
        return path, z["arr_0"], z["labels"]


@pytest.mark.slow
def test_readme_command_works_on_a_default_run_and_says_which_weights(runs, tmp_path):
    out, _ = runs
    plain = sample("--ckpt", f"{out}/plain/checkpoints/last.ckpt", "--out", str(tmp_path / "a"))
    assert "live weights" in plain.stdout  # no EMA in the checkpoint: the live weights, said so
    ema = sample("--ckpt", f"{out}/ema", "--out", str(tmp_path / "b"))
    assert "ema weights" in ema.stdout
    _, images, labels = npz_of(tmp_path / "a")
    assert images.shape == (40, 8, 8, 3) and images.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(40)]
    assert glob.glob(str(tmp_path / "a" / "*.png")) and glob.glob(str(tmp_path / "a" / "*.json"))


@pytest.mark.slow
def test_bad_sampling_setting_is_one_line_exit_2(runs, tmp_path):
    out, _ = runs
    for bad in ("sample.num_steps=8", "sample.kernels=mkl", "sample.draw=gumbel", "sample.top_k=abc"):
        proc = sample("--ckpt", f"{out}/plain", "--out", str(tmp_path), bad, ok=False)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert bad.split("=")[0] in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_write_shards_resume_and_merge_to_the_one_rank_set(runs, tmp_path):
    out, _ = runs
    ckpt = f"{out}/plain"
    common = ["--num-samples", "50", "--batch-size", "10"]
    sample("--ckpt", ckpt, "--out", str(tmp_path / "one"), *common)
    two = sample("--ckpt", ckpt, "--out", str(tmp_path / "two"), *common, ranks=2)
    assert "rank 1: 2 batches sampled" in two.stdout and "rank 0: 3 batches sampled" in two.stdout
    _, a, la = npz_of(tmp_path / "one")
    path, b, lb = npz_of(tmp_path / "two")
    assert np.array_equal(a, b) and np.array_equal(la, lb)  # the set does not depend on the number of ranks
    # a killed run: two shards missing and the merged file gone; the same command redoes only those
    shards = sorted(glob.glob(str(tmp_path / "two" / "*.shards" / "batch-*.npz")))
    assert len(shards) == 5
    for s in shards[1:3]:
        os.remove(s)
    os.remove(path)
    again = sample("--ckpt", ckpt, "--out", str(tmp_path / "two"), *common, ranks=2)
    assert "rank 0: 1 batches sampled, 2 already on disk" in again.stdout
    assert "rank 1: 1 batches sampled, 1 already on disk" in again.stdout
    _, c, _ = npz_of(tmp_path / "two")
    assert np.array_equal(a, c)


@pytest.mark.slow
def test_offline_npz_scores_exactly_the_logged_val_fid(runs, tmp_path):
    out, ext = runs
    logged = json.loads((out / "ema" / "metrics.json").read_text())
    assert "val/fid20" in logged
    sample("--ckpt", f"{out}/ema", "--out", str(tmp_path), "--num-samples", "20")
    npz, _, _ = npz_of(tmp_path)
    proc = run([sys.executable, "-m", "experiments.evaluate", "--samples", npz, "--ref", "digits:val",
                "--extractor", "digits", "--extractor-weights", str(ext), "--out", str(tmp_path / "m.json"),
                "--no-pr"])
    offline = json.loads((tmp_path / "m.json").read_text())["fid"]
    assert offline == pytest.approx(logged["val/fid20"], rel=1e-6, abs=1e-6), proc.stdout


def test_streamed_merge_equals_concatenation(tmp_path):
    from experiments.sample_shards import done_batches, merge_shards, write_shard

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8) for n in (5, 5, 3)]
    for b, images in enumerate(parts):
        write_shard(str(tmp_path), b, images=images, labels=np.arange(len(images)) + 10 * b)
    (tmp_path / "batch-000009.npz.tmp.npz").write_bytes(b"half-written")  # a kill mid-write: ignored
    assert done_batches(str(tmp_path)) == {0, 1, 2}
    assert merge_shards(str(tmp_path), [0, 1, 2], str(tmp_path / "all.npz")) == 13
    with np.load(tmp_path / "all.npz") as z:
        assert np.array_equal(z["arr_0"], np.concatenate(parts))
        assert z["labels"].tolist() == [*range(5), *range(10, 15), *range(20, 23)]
