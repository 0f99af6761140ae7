"""DataStatsCallback in a single-process Lightning fit, and the data throughput benchmark."""
import json

import lightning as L
import torch

from data_helpers import make_shards
from datamodules.images import ImageShardDataModule
from datamodules.loader import SkipTracker
from experiments.bench_data import bench_data, main as bench_main, write_synthetic_shards
from lightning_modules.callbacks.data_stats import DataStatsCallback


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w * batch["image"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_counts_exactly_and_logs(tmp_path):
    # one pass per epoch (resampled=False) so the skip count is known: 2 bad train members, 1 bad val member
    pattern = make_shards(str(tmp_path / "t"), 2, 8, bad={(0, 1): "garbage_jpg", (1, 7): "cut_jpg"})
    val = make_shards(str(tmp_path / "v"), 1, 6, prefix="val", bad={(0, 0): "no_cls"})
    dm = ImageShardDataModule(pattern, val, batch_size=4, num_workers=2, image_size=8, resampled=False)
    cb = DataStatsCallback(every_n_batches=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[cb])
    trainer.fit(Tiny(), datamodule=dm)
    assert cb.final_skipped == 2 * (2 + 1) == dm.skipped_total()  # 2 epochs x (train 2 + val 1)
    assert cb.final_images_seen == 2 * 14
    assert trainer.callback_metrics["data/images_seen"] == 28  # logged on the last batch
    state = cb.state_dict()
    resumed = DataStatsCallback()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state == {"skipped": 6, "images_seen": 28}


def test_skip_tracker_max_per_worker_sum_over_passes():
    t = SkipTracker()
    for skipped, worker in [(0, 0), (1, 1), (2, 0), (1, 1)]:
        t.update({"_skipped": skipped, "_worker": worker})
    assert t.total() == 3
    t.new_pass()  # counts restart per pass in the workers
    t.update({"_skipped": 1, "_worker": 0})
    assert t.total() == 4


def test_bench_data_synthetic(tmp_path):
    pattern = write_synthetic_shards(str(tmp_path), n_shards=2, per_shard=8, size=64)
    result = bench_data(pattern, image_size=32, workers=(0,), batches=2, batch_size=4)
    (r,) = result["results"]
    assert r["workers"] == 0 and r["images"] == 8 and r["images_per_s"] > 0 and r["skipped"] == 0
    out = tmp_path / "bench.json"
    assert bench_main(["--shards", pattern, "--image-size", "32", "--workers", "0", "--batches", "2",
                       "--batch-size", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["images"] == 8
