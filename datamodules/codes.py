"""Pre-tokenized code shards → {"codes": int64 [B,h,w], "label": int64 [B]} batches (same contract as images.py).

Shard format (written by tokenizers/pretokenize.py): ``codes-*.tar`` with samples ``{key}.codes.npy`` (int16 or
int32 array [n_aug, h, w]: one code grid per augmentation variant, e.g. ten-crop x flip) and ``{key}.cls``;
``manifest.json`` beside them = {"num_samples", "shards": {name: count}, "tokenizer": {"kind", "fingerprint",
"config", "vocab_size"}, "grid": [h, w], "crop_policy", "num_variants"}.

Training picks ONE variant per sample, uniformly, from a generator seeded by (seed, rank, worker, epoch), so a
sample is seen once per epoch under a fresh augmentation and the same seed replays it. Validation takes
variant 0 (the plain centre crop by the pretokenizer's convention). Codes made by another tokenizer are refused
up front: pass the trainer's tokenizer fingerprint as ``expected_fingerprint``. So are shards their folder's
manifest does not list (a rerun of pretokenize into the folder can leave an earlier run's beside it), and train
and val codes whose manifests record different class maps (val labels would name other classes).
"""
from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import torch

from datamodules.images import ShardDataModule, parse_label
from tokenizers.base import check_fingerprint

CODES_KEY = "codes.npy"


def load_code_manifest(first_shard: str, what: str) -> tuple[str, dict]:
    """(path, manifest) of the code-shard manifest beside ``first_shard``; one-line errors on bad files."""
    path = os.path.join(os.path.dirname(first_shard), "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:  # pretokenize removes it when it starts and writes it when it completes
        raise FileNotFoundError(f"{what}: code-shard manifest not found: {path} (pretokenize writes it when it "
                                f"completes: was it stopped? run it again)") from None
    except ValueError as exn:
        raise ValueError(f"{path}: not valid JSON ({exn})") from None
    for key in ("tokenizer", "grid"):
        if key not in manifest:
            raise ValueError(f"{path}: code-shard manifest has no {key!r} entry")
    return path, manifest


def check_listed(urls: list[str], what: str) -> None:
    """Every shard is one its folder's manifest.json lists: the manifest's fingerprint and counts say nothing about
    the others (an earlier pretokenize run's, e.g. codes-r1-*.tar of a 2-rank run before a 1-rank one)."""
    manifests: dict[str, tuple[str, dict]] = {}
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in manifests:
            manifests[folder] = load_code_manifest(url, what)
        path, manifest = manifests[folder]
        if isinstance(manifest.get("shards"), dict) and name not in manifest["shards"]:
            raise ValueError(f"{what}: {url} is not in {path} (left by an earlier pretokenize run?); give the "
                             f"manifest's shards (data.code_dir reads exactly those)")


class CodeDecoder:
    """Picklable per-sample decode (runs in DataLoader workers): codes.npy -> int64 [h, w], label."""

    def __init__(self, grid: tuple[int, int], vocab_size: int | None):
        self.grid, self.vocab_size = tuple(grid), vocab_size

    def __call__(self, sample: dict, rng: random.Random, train: bool) -> tuple[np.ndarray, int]:
        if CODES_KEY not in sample:
            raise ValueError(f"no {CODES_KEY!r} member; members {sorted(sample)}")
        arr = np.load(io.BytesIO(sample[CODES_KEY]), allow_pickle=False)  # [n_aug, h, w]
        if arr.ndim == 2:
            arr = arr[None]  # a single variant stored without its axis
        if arr.ndim != 3 or tuple(arr.shape[1:]) != self.grid or arr.dtype.kind not in "iu" or not len(arr):
            raise ValueError(f"codes {arr.dtype} {list(arr.shape)} do not match [n_aug, {self.grid[0]}, "
                             f"{self.grid[1]}] integer codes of the manifest")
        variant = rng.randrange(arr.shape[0]) if train else 0
        codes = arr[variant].astype(np.int64)  # [h, w]
        if self.vocab_size and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"codes outside [0, {self.vocab_size}) (min {codes.min()}, max {codes.max()})")
        return codes, parse_label(sample)


def collate_codes(arrays: list[np.ndarray]) -> dict:
    return {"codes": torch.from_numpy(np.stack(arrays))}  # [B, h, w] int64


class CodeShardDataModule(ShardDataModule):
    """Code WebDataset shards; arguments as ImageShardDataModule, plus ``expected_fingerprint``.

    Exposes ``grid`` (h, w), ``vocab_size``, ``tokenizer_info`` and ``manifest`` (of the train shards).
    """

    collate = staticmethod(collate_codes)

    def __init__(self, train_shards, val_shards=None, batch_size: int = 64, num_workers: int = 4,
                 samples_per_epoch: int | None = None, seed: int = 0, resampled: bool = True,
                 persistent_workers: bool = True, shuffle_buffer: int = 1000, val_batch_size: int | None = None,
                 expected_fingerprint: str | None = None):
        super().__init__(train_shards, val_shards, batch_size, num_workers, samples_per_epoch, seed, resampled,
                         persistent_workers, shuffle_buffer, val_batch_size)
        self.manifest_path, self.manifest = load_code_manifest(self.train_urls[0], "data.train_shards")
        manifests = [(self.manifest_path, self.manifest)]
        if self.val_urls:
            manifests.append(load_code_manifest(self.val_urls[0], "data.val_shards"))
        for path, manifest in manifests:
            if expected_fingerprint is not None:
                check_fingerprint(expected_fingerprint, str(manifest["tokenizer"].get("fingerprint")), where=path)
            if list(manifest["grid"]) != list(self.manifest["grid"]):
                raise ValueError(f"{path}: grid {manifest['grid']} differs from the train shards' "
                                 f"{self.manifest['grid']} ({self.manifest_path})")
            if manifest.get("classes") and self.manifest.get("classes") and \
                    manifest["classes"] != self.manifest["classes"]:
                raise ValueError(f"{path}: its classes ({len(manifest['classes'])}, from the val image shards' "
                                 f"classes.json) differ from those of the train codes ({self.manifest_path}: "
                                 f"{len(self.manifest['classes'])}), so val labels would name other classes")
        check_listed(self.train_urls, "data.train_shards")
        check_listed(self.val_urls, "data.val_shards")
        self.tokenizer_info = self.manifest["tokenizer"]
        self.grid = tuple(int(g) for g in self.manifest["grid"])
        self.vocab_size = self.tokenizer_info.get("vocab_size")

    def decoder(self, train: bool) -> CodeDecoder:
        return CodeDecoder(self.grid, self.vocab_size)
