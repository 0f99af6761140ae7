"""The embedded digits dataset as WebDataset shards, so the default run uses the same pipeline as ImageNet.

    python -m datamodules.embedded --out data/digits [--seed 0]

Writes ``train-000000.tar ...`` and ``val-000000.tar ...`` (samples: ``__key__`` = "{split}_{index:05d}",
``png`` = 8x8 greyscale PNG, ``cls`` = ASCII class) plus ``manifest.json``. The index in the key is the row of
``digits_arrays(split, seed)``, so anything read back can be checked against the arrays. Idempotent: a folder
that already holds a complete manifest for the same seed is left alone.
"""
from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import sys

import numpy as np
from PIL import Image

from datamodules.digits import SPLITS, digits_arrays
from datamodules.shards import write_tar

SHARD_SIZE = 256  # small shards: 6 train / 2 val, enough for 2 ranks x 2 workers to get whole shards
FORMAT_VERSION = 1


def png_bytes(img: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG")  # [8, 8] uint8 -> mode "L", lossless
    return out.getvalue()


def split_pattern(split: str, n_shards: int) -> str:
    """Brace pattern of a split's shards, relative to the folder: "train-{000000..000005}.tar"."""
    return f"{split}-{{000000..{n_shards - 1:06d}}}.tar" if n_shards > 1 else f"{split}-000000.tar"


def _complete(out: str, manifest: dict, seed: int) -> bool:
    if manifest.get("dataset") != "digits" or manifest.get("seed") != seed \
            or manifest.get("format_version") != FORMAT_VERSION:
        return False
    sizes = manifest.get("bytes", {})
    for split in SPLITS:
        shards = manifest.get("splits", {}).get(split, {}).get("shards") or {}
        if not shards:
            return False
        for name in shards:  # a deleted or half-copied shard makes the set incomplete
            path = os.path.join(out, name)
            if not os.path.isfile(path) or os.path.getsize(path) != sizes.get(name):
                return False
    return True


def read_manifest(out: str) -> dict | None:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_embedded(out: str, seed: int = 0, verbose: bool = True) -> dict:
    """Write the digits shards into ``out`` unless a complete matching set is there; returns the manifest.

    Manifest: {"dataset": "digits", "splits": {split: {"num_samples", "shards": {name: count}, "pattern"}},
    "image_size": 8, "num_classes": 10, "seed", "format_version", "bytes": {name: size}}.
    """
    manifest = read_manifest(out)
    if manifest is not None and _complete(out, manifest, seed):
        if verbose:
            print(f"embedded: digits shards already complete in {out}")
        return manifest
    os.makedirs(out, exist_ok=True)
    # every DDP rank calls this at start-up: one writes, the others wait on the lock and find the set complete
    with open(os.path.join(out, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(out)
        if manifest is not None and _complete(out, manifest, seed):
            return manifest
        return _write(out, seed, verbose)


def _write(out: str, seed: int, verbose: bool) -> dict:
    manifest = {"dataset": "digits", "splits": {}, "image_size": 8, "num_classes": 10, "seed": seed,
                "format_version": FORMAT_VERSION, "bytes": {}}
    for split in SPLITS:
        images, labels = digits_arrays(split, seed)  # [n, 8, 8] uint8, [n] int64
        shards = {}
        for s, start in enumerate(range(0, len(labels), SHARD_SIZE)):
            name = f"{split}-{s:06d}.tar"
            rows = range(start, min(start + SHARD_SIZE, len(labels)))
            shards[name] = write_tar(os.path.join(out, name), (
                {"__key__": f"{split}_{i:05d}", "png": png_bytes(images[i]), "cls": int(labels[i])} for i in rows))
            manifest["bytes"][name] = os.path.getsize(os.path.join(out, name))
        manifest["splits"][split] = {"num_samples": int(len(labels)), "shards": shards,
                                     "pattern": split_pattern(split, len(shards))}
    path = os.path.join(out, "manifest.json")
    with open(path + ".tmp", "w") as f:  # the manifest goes last: its presence means the shards are complete
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
    if verbose:
        counts = ", ".join(f"{k} {v['num_samples']}" for k, v in manifest["splits"].items())
        print(f"embedded: wrote digits shards ({counts}) to {out}")
    return manifest


def embedded_shards(out: str, split: str, manifest: dict | None = None) -> str:
    """Full brace pattern of a split, e.g. for ImageShardDataModule(train_shards=...)."""
    manifest = manifest or read_manifest(out)
    if manifest is None or split not in manifest.get("splits", {}):
        raise FileNotFoundError(f"{out}/manifest.json: no digits split {split!r} (run python -m datamodules.embedded)")
    return os.path.join(out, manifest["splits"][split]["pattern"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the embedded digits dataset as WebDataset shards.")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    a = p.parse_args(argv)
    ensure_embedded(a.out, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
