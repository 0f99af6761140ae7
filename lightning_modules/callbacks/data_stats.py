"""DataStatsCallback: logs ``data/skipped`` and ``data/images_seen``, global over DataLoader workers and ranks.

Counts come from the batches themselves: the shard DataModules attach each worker's running skip count
(``batch["_skipped"]``, ``batch["_worker"]``, see datamodules/wds_utils.py), which is the only channel that
survives DataLoader worker processes. Per rank: max per worker within a pass, summed over passes; across
ranks: an all-reduce every ``every_n_batches`` training batches (all ranks reach it together, since the shard
DataModules give every rank the same number of batches) and once at the end of training.

After ``fit``, ``final_skipped`` / ``final_images_seen`` hold the global totals for metrics.json. The totals are
all-reduced after every training batch and checkpoints store them (no collective inside checkpointing, which can
run on one rank only), so a resumed run continues from the exact count; the resumed loader reports only skips
after the resume point (datamodules/loader.py), not those of the batches it regenerates.
"""
from __future__ import annotations

import torch
from lightning.pytorch import Callback

from datamodules.loader import SkipTracker


def batch_size_of(batch) -> int:
    """Samples in a batch dict: the length of "label" (every roar batch has one), else of the first tensor."""
    if isinstance(batch, dict):
        for value in [batch.get("label"), *batch.values()]:
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    return 0


class DataStatsCallback(Callback):
    """Log skipped samples (corrupt members, undecodable images, truncated tars) and images seen."""

    def __init__(self, every_n_batches: int | None = None, include_val: bool = True):
        self.every_n_batches = every_n_batches  # None: the trainer's log_every_n_steps
        self.include_val = include_val
        self.train_tracker, self.val_tracker = SkipTracker(), SkipTracker()
        self.local_images = 0
        self.offset_skipped, self.offset_images = 0, 0  # global totals restored from a checkpoint
        self.last_global = (0, 0)  # (skipped, images_seen) of the latest all-reduce, for checkpoints
        self.final_skipped: int | None = None
        self.final_images_seen: int | None = None

    # -- counting (per rank, no communication)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.train_tracker.new_pass()
        self.train_tracker.update(batch)
        self.local_images += batch_size_of(batch)
        # every batch: a checkpoint saved after this batch (ModelCheckpoint runs after this callback, SlurmRequeue at
        # any step) then holds exact totals; two int64s per step next to the gradient all-reduce
        skipped, images = self._global(trainer, pl_module)
        every = self.every_n_batches or trainer.log_every_n_steps or 50
        if (batch_idx + 1) % every == 0:
            pl_module.log("data/skipped", float(skipped), on_step=True, on_epoch=False, batch_size=1)
            pl_module.log("data/images_seen", float(images), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not self.include_val:
            return
        if batch_idx == 0:
            self.val_tracker.new_pass()
        self.val_tracker.update(batch)

    def local_skipped(self) -> int:
        return self.train_tracker.total() + self.val_tracker.total()

    # -- global totals (collective: every rank must call together)
    def _global(self, trainer, pl_module) -> tuple[int, int]:
        local = torch.tensor([self.local_skipped(), self.local_images], dtype=torch.int64, device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        self.last_global = (self.offset_skipped + int(total[0]), self.offset_images + int(total[1]))
        return self.last_global

    def on_train_end(self, trainer, pl_module) -> None:
        self.final_skipped, self.final_images_seen = self._global(trainer, pl_module)

    # -- checkpointing: global totals as of the last all-reduce; a resumed run adds its own counts on top
    def state_dict(self) -> dict:
        return {"skipped": self.last_global[0], "images_seen": self.last_global[1]}

    def load_state_dict(self, state: dict) -> None:
        self.offset_skipped = int(state.get("skipped", 0))
        self.offset_images = int(state.get("images_seen", 0))
        self.last_global = (self.offset_skipped, self.offset_images)
