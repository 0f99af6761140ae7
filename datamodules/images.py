"""Image shards (jpg/png + cls) → {"image": uint8 [B,3,H,W], "label": int64 [B]} batches for Lightning.

Also ``ShardDataModule``, the base both shard DataModules share (codes.py adds a code decoder to it).

Batch contract (every batch, train and val):
    "image"    uint8  [B, 3, H, W]   (codes.py: "codes" int64 [B, h, w])
    "label"    int64  [B]
    "_skipped" int    skip events so far in the emitting worker's pass   } read by DataStatsCallback;
    "_worker"  int    DataLoader worker id                               } LightningModules ignore "_" keys
    "_key"     list[str]  sample keys

Epoch accounting (train, resampled=True): samples_per_epoch is GLOBAL; each of world_size * num_workers
workers yields samples_per_epoch // (world_size * num_workers) samples rounded down to whole batches, so an
epoch is the same length on every rank (DDP never waits on a rank that ran dry). Shards are split across ranks
and workers (disjoint), resampled with replacement inside each slot, shuffled with seeds (seed, rank, worker,
epoch). Validation: one pass, no shuffle, disjoint per rank; the last batch may be partial and ranks may get
a different number of batches, so log val metrics with torchmetrics / epoch-end sync, not per-step all-reduce.
resampled=False trains on one pass per epoch: only safe under DDP when every rank gets the same batch count.
"""
from __future__ import annotations

import io
import random
import warnings
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image

from datamodules import wds_utils as W
from datamodules.loader import EpochLoader, SkipTracker
from datamodules.transforms import adm_center_crop, maybe_hflip, resize_square, to_rgb

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# Lightning warns that __len__ of a multi-worker IterableDataset may double count; ours splits data per worker
# and __len__ is exactly the batches per rank, so the warning is a false alarm on every run.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


def parse_label(sample: dict) -> int:
    if "cls" not in sample:
        raise ValueError("no 'cls' member")
    return int(sample["cls"].decode("ascii").strip())


class ShardDataModule(L.LightningDataModule):
    """Shared train/val loader building; subclasses provide ``decoder()`` and ``collate``."""

    collate = None  # staticmethod in subclasses: list of per-sample arrays -> dict of batched tensors

    def __init__(self, train_shards, val_shards=None, batch_size: int = 64, num_workers: int = 4,
                 samples_per_epoch: int | None = None, seed: int = 0, resampled: bool = True,
                 persistent_workers: bool = True, shuffle_buffer: int = 1000, val_batch_size: int | None = None):
        super().__init__()
        self.train_urls = W.expand_shards(train_shards, "data.train_shards")
        self.val_urls = W.expand_shards(val_shards, "data.val_shards") if val_shards else []
        W.check_shards_exist(self.train_urls, "data.train_shards")
        W.check_shards_exist(self.val_urls, "data.val_shards")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"data: batch_size {batch_size} must be >= 1 and num_workers {num_workers} >= 0")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_batch_size = val_batch_size or batch_size
        self.resampled, self.persistent_workers, self.shuffle_buffer = resampled, persistent_workers, shuffle_buffer
        self.train_counts = W.read_manifest_counts(self.train_urls)
        self.val_counts = W.read_manifest_counts(self.val_urls) if self.val_urls else None
        if samples_per_epoch is None and self.train_counts is not None:
            samples_per_epoch = sum(self.train_counts.values())
        self.samples_per_epoch = samples_per_epoch  # None: checked when a resampled train loader is built
        self._trackers: list[SkipTracker] = []  # not the loaders: their workers may end with them

    # -- subclass hooks
    def decoder(self, train: bool) -> W.Decoder:
        raise NotImplementedError

    # -- loaders
    def batches_per_worker(self, world: int) -> int:
        """Whole batches each worker yields per epoch: samples_per_epoch // (world * workers) // batch_size."""
        if self.samples_per_epoch is None:
            raise ValueError(f"data.samples_per_epoch: not given and no manifest lists {self.train_urls[0]}")
        per_worker = self.samples_per_epoch // (world * max(1, self.num_workers))
        if per_worker < self.batch_size:
            raise ValueError(f"data.samples_per_epoch={self.samples_per_epoch} is less than one batch of "
                             f"{self.batch_size} per worker ({world} ranks x {max(1, self.num_workers)} workers)")
        return per_worker // self.batch_size

    def _loader(self, urls, counts, train: bool, batch_size: int, num_workers: int) -> EpochLoader:
        _, world = W.world_info()
        stream = W.ShardStream(
            urls, self.decoder(train), type(self).collate, batch_size, train=train,
            resampled=self.resampled, seed=self.seed, epoch=W.SharedEpoch(), num_workers=num_workers,
            shuffle_buffer=self.shuffle_buffer if train else 0, counts=counts,
            batches_per_worker=self.batches_per_worker(world) if train and self.resampled else None)
        loader = EpochLoader(stream, num_workers, self.persistent_workers)
        self._trackers.append(loader.tracker)
        return loader

    def train_dataloader(self) -> EpochLoader:
        return self._loader(self.train_urls, self.train_counts, True, self.batch_size, self.num_workers)

    def val_dataloader(self):
        if not self.val_urls:
            return []
        _, world = W.world_info()
        # more workers than shards per rank would only read the same shards to drop most samples
        workers = min(self.num_workers, max(1, len(self.val_urls) // world)) if self.num_workers else 0
        return self._loader(self.val_urls, self.val_counts, False, self.val_batch_size, workers)

    def skipped_total(self) -> int:
        """Skip events seen by this rank's loaders (all workers, all passes so far); DataStatsCallback sums ranks."""
        return sum(tracker.total() for tracker in self._trackers)


class ImageDecoder:
    """Picklable per-sample decode (runs in DataLoader workers): bytes -> uint8 [H, W, 3], label."""

    def __init__(self, image_size: int, center_crop: str, random_flip: bool):
        self.image_size, self.center_crop, self.random_flip = image_size, center_crop, random_flip

    def __call__(self, sample: dict, rng: random.Random, train: bool) -> tuple[np.ndarray, int]:
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            raise ValueError(f"no image member (one of {IMAGE_KEYS}); members {sorted(sample)}")
        label = parse_label(sample)
        with Image.open(io.BytesIO(sample[ext])) as pil:
            pil = to_rgb(pil)  # a decoded copy: truncated or garbage bytes fail here, inside the worker
        crop = adm_center_crop if self.center_crop == "adm" else resize_square
        arr = np.asarray(crop(pil, self.image_size))  # [H, W, 3]
        if train and self.random_flip:
            arr = maybe_hflip(arr, rng)
        return arr, label


def collate_images(arrays: list[np.ndarray]) -> dict:
    # [B, H, W, 3] -> [B, 3, H, W]; np.stack copies, so the tensor owns writable memory
    return {"image": torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()}


class ImageShardDataModule(ShardDataModule):
    """Image WebDataset shards (see module docstring). batch_size is per device (derived from the global batch).

    ImageNet: ImageShardDataModule("shards/train-{000000..001281}.tar", "shards/val-{000000..000049}.tar",
    batch_size=64, num_workers=8, image_size=256); samples_per_epoch defaults to the manifest total.
    """

    collate = staticmethod(collate_images)

    def __init__(self, train_shards, val_shards=None, batch_size: int = 64, num_workers: int = 4,
                 image_size: int = 256, samples_per_epoch: int | None = None, seed: int = 0,
                 random_flip: bool = True, center_crop: Literal["adm", "none"] = "adm", resampled: bool = True,
                 persistent_workers: bool = True, shuffle_buffer: int = 1000, val_batch_size: int | None = None):
        if center_crop not in ("adm", "none"):
            raise ValueError(f"data.center_crop: {center_crop!r} is not one of 'adm', 'none'")
        super().__init__(train_shards, val_shards, batch_size, num_workers, samples_per_epoch, seed, resampled,
                         persistent_workers, shuffle_buffer, val_batch_size)
        self.image_size, self.random_flip, self.center_crop = image_size, random_flip, center_crop

    def decoder(self, train: bool) -> ImageDecoder:
        return ImageDecoder(self.image_size, self.center_crop, self.random_flip)
