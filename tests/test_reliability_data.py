"""A run over 100 digit shards of which 10 are corrupt (garbage PNG bytes, a missing cls, a tar cut inside a
member, a tar cut inside a header) finishes, and the skip count in metrics.json (``data_skipped``) and TensorBoard
(``data/skipped``) equals the number of skip events that actually happened.

Training draws shards with replacement (resampled), so a corrupt shard is read 0, 1 or more times, and a read cut
short by the end of an epoch never meets its corruption. The expected count therefore comes from an oracle that
does not share the counting code: the decoder is watched for calls on the corrupt keys (each one raises), and the
shard reader for reads of a truncated tar that ran to their end (each one is exactly one event)."""
from __future__ import annotations

import glob
import json
import os
import tarfile

import pytest

from conftest import REPO
from data_helpers import truncate_inside
from experiments.config import load_config

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")
N_SHARDS, PER_SHARD = 100, 8
GARBAGE_PNG, NO_CLS = (7, 23, 61), (12, 48, 90)  # shard indices; sample 3 of each is bad
CUT_MEMBER, CUT_HEADER = (35, 77), (5, 54)  # shard indices; the tar is cut at sample 5


def write_digit_shards(folder: str) -> tuple[str, str, set[str], set[str]]:
    """-> (train pattern, val pattern, keys that fail to decode, urls of truncated tars)."""
    from datamodules.digits import digits_arrays
    from datamodules.embedded import png_bytes
    from datamodules.shards import write_tar

    images, labels = digits_arrays("train")
    os.makedirs(folder, exist_ok=True)
    bad_keys, truncated = set(), set()
    for s in range(N_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            row = (s * PER_SHARD + i) % len(labels)
            sample = {"__key__": f"d{s:03d}_{i}", "png": png_bytes(images[row]), "cls": int(labels[row])}
            if i == 3 and s in GARBAGE_PNG:
                sample["png"] = b"\x89PNG\r\n\x1a\n but not really"
            if i == 3 and s in NO_CLS:
                del sample["cls"]
            if i == 3 and s in GARBAGE_PNG + NO_CLS:
                bad_keys.add(sample["__key__"])
            samples.append(sample)
        write_tar(os.path.join(folder, f"train-{s:06d}.tar"), samples)
    for s in CUT_MEMBER:  # a copy that died inside the PNG data of sample 5: samples 5..7 lost, one event
        path = os.path.join(folder, f"train-{s:06d}.tar")
        truncate_inside(path, f"d{s:03d}_5.png", keep=10)
        truncated.add(path)
    for s in CUT_HEADER:  # died 100 bytes into the header block of sample 5's first member
        path = os.path.join(folder, f"train-{s:06d}.tar")
        with tarfile.open(path) as tar:
            offset = tar.getmember(f"d{s:03d}_5.png").offset
        with open(path, "r+b") as f:
            f.truncate(offset + 100)
        truncated.add(path)
    write_tar(os.path.join(folder, "val-000000.tar"), [
        {"__key__": f"v{i}", "png": png_bytes(images[i]), "cls": int(labels[i])} for i in range(16)])
    return (os.path.join(folder, f"train-{{000000..{N_SHARDS - 1:06d}}}.tar"), os.path.join(folder, "val-000000.tar"),
            bad_keys, truncated)


class Oracle:
    """Counts skip events from outside the stream's own bookkeeping (see the module docstring)."""

    def __init__(self, bad_keys: set[str], truncated: set[str]):
        self.bad_keys, self.truncated = bad_keys, truncated
        self.bad_decodes, self.finished_truncated_reads, self.unexpected = 0, 0, []
        self.by_shard: dict[int, int] = {}  # shard index -> events, to see that every kind of damage was met

    def note(self, shard: int) -> None:
        self.by_shard[shard] = self.by_shard.get(shard, 0) + 1

    def watch_reader(self, real):
        def reader(url, on_error):
            yield from real(url, on_error)
            if url in self.truncated:  # the read got to the cut: one event
                self.finished_truncated_reads += 1
                self.note(int(os.path.basename(url)[6:12]))
        return reader

    def watch_decoder(self, real):
        oracle = self

        def decode(self, sample, rng, train):
            bad = sample["__key__"] in oracle.bad_keys
            if bad:
                oracle.bad_decodes += 1
                oracle.note(int(sample["__key__"][1:4]))
            try:
                return real(self, sample, rng, train)
            except Exception:
                if not bad:
                    oracle.unexpected.append(sample["__key__"])
                raise
        return decode

    @property
    def events(self) -> int:
        return self.bad_decodes + self.finished_truncated_reads


def test_corrupt_shards_are_skipped_counted_exactly_and_logged(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import datamodules.wds_utils as W
    from datamodules.images import ImageDecoder
    from experiments.train import run

    train, val, bad_keys, truncated = write_digit_shards(str(tmp_path / "shards"))
    oracle = Oracle(bad_keys, truncated)
    monkeypatch.setattr(W, "iter_tar_samples", oracle.watch_reader(W.iter_tar_samples))
    monkeypatch.setattr(ImageDecoder, "__call__", oracle.watch_decoder(ImageDecoder.__call__))
    cfg = load_config([DEMO], [
        "model.size=debug", f"out_dir={tmp_path}", "name=corrupt", "trainer.accelerator=cpu",
        "data.kind=images", f"data.train_shards={train}", f"data.val_shards={val}", "data.image_size=8",
        "data.samples_per_epoch=400", "data.num_workers=0",  # in process, so the oracle sees every read
        "trainer.global_batch_size=8", "trainer.max_steps=100", "trainer.log_every_steps=10",  # 2 epochs of 50
        "trainer.val_every_steps=100", "trainer.limit_val_batches=1", "trainer.ckpt_every_steps=100",
        "callbacks.sample_every_steps=0"])
    result = run(cfg, quiet=True)

    assert result["steps"] == 100  # the run finished
    assert oracle.unexpected == [], f"good samples failed to decode: {oracle.unexpected[:5]}"
    # the fixed seed reads enough corrupt shards to make this mean something: every kind of damage is met
    for kind in (GARBAGE_PNG, NO_CLS, CUT_MEMBER, CUT_HEADER):
        assert any(oracle.by_shard.get(s) for s in kind), (kind, oracle.by_shard)
    metrics = json.load(open(os.path.join(str(tmp_path), "corrupt", "metrics.json")))
    assert metrics["data_skipped"] == result["data_skipped"] == oracle.events
    events = EventAccumulator(glob.glob(os.path.join(str(tmp_path), "corrupt", "tb"))[0],
                              size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("data/skipped")
    assert logged[-1].step >= 99 and logged[-1].value == oracle.events  # the last log covers the last batch
    assert all(a.value <= b.value for a, b in zip(logged, logged[1:]))  # a running total


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_count_survives_a_mid_epoch_resume_exactly(tmp_path, workers):
    """Stopped at step 30 (mid-epoch, 2 steps after the last logged all-reduce) and resumed to 75: data_skipped and
    images_seen equal an uninterrupted run's. The resumed loader regenerates the 30 batches it already served
    (their skips are in the checkpoint) and must not count them again."""
    from experiments.train import run

    train, val, _, _ = write_digit_shards(str(tmp_path / "shards"))

    def cfg(name: str, steps: int):
        return load_config([DEMO], [
            "model.size=debug", f"out_dir={tmp_path}", f"name={name}", "trainer.accelerator=cpu",
            "data.kind=images", f"data.train_shards={train}", f"data.val_shards={val}", "data.image_size=8",
            "data.samples_per_epoch=400", f"data.num_workers={workers}", "trainer.global_batch_size=8",
            f"trainer.max_steps={steps}", "trainer.log_every_steps=7", "trainer.val_every_steps=1000",
            "trainer.limit_val_batches=1", "trainer.ckpt_every_steps=30", "callbacks.sample_every_steps=0",
            "resume=auto"])

    whole = run(cfg("whole", 75), quiet=True)
    run(cfg("parts", 30), quiet=True)
    resumed = run(cfg("parts", 75), quiet=True)
    metrics = {name: json.load(open(os.path.join(str(tmp_path), name, "metrics.json"))) for name in ("whole", "parts")}
    assert whole["data_skipped"] > 0 and resumed["steps"] == 75
    assert metrics["parts"]["data_skipped"] == metrics["whole"]["data_skipped"]
    assert metrics["parts"]["images_seen"] == metrics["whole"]["images_seen"] == 75 * 8
