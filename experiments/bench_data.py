"""Data-loading throughput: images/s of shard read + JPEG decode + ADM crop + flip, per DataLoader worker count.

    python -m experiments.bench_data --out runs/bench/data.json                       # synthetic 256x256 shards
    python -m experiments.bench_data --shards "/data/imagenet-wds/train-{000000..000099}.tar" --image-size 256

Runs the real training loader (ImageShardDataModule, resampled, seeded) and times ``batches`` batches after the
first one (worker start-up and the shuffle buffer filling are reported separately as ``first_batch_s``).
The training step needs ``images_per_s`` >= its own images/s, or the GPUs wait on data.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from datamodules.images import ImageShardDataModule
from datamodules.shards import write_tar


def write_synthetic_shards(folder: str, n_shards: int = 4, per_shard: int = 64, size: int = 256,
                           seed: int = 0) -> str:
    """JPEG shards of smooth random images (JPEG-compressible like photos, unlike white noise); returns a pattern."""
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)  # upsampled: smooth content
            img = np.repeat(np.repeat(low, 16, 0), 16, 1)
            out = io.BytesIO()
            Image.fromarray(img).save(out, format="JPEG", quality=90)
            samples.append({"__key__": f"syn_{s:03d}_{i:05d}", "jpg": out.getvalue(), "cls": int(i % 10)})
        write_tar(os.path.join(folder, f"train-{s:06d}.tar"), samples)
    return os.path.join(folder, f"train-{{000000..{n_shards - 1:06d}}}.tar")


def bench_data(shards: str | None = None, image_size: int = 256, workers=(0, 1, 2), batches: int = 20,
               batch_size: int = 32, seed: int = 0) -> dict:
    """{"results": [{"workers", "images_per_s", "seconds", "first_batch_s", "skipped"}], ...} per worker count."""
    tmp = None
    if not shards:
        tmp = tempfile.TemporaryDirectory(prefix="roar-bench-data-")
        shards = write_synthetic_shards(tmp.name)
    results = []
    try:
        for nw in workers:
            dm = ImageShardDataModule(shards, batch_size=batch_size, num_workers=nw, image_size=image_size,
                                      samples_per_epoch=(batches + 1) * batch_size * max(1, nw), seed=seed,
                                      shuffle_buffer=100, persistent_workers=False)
            loader = dm.train_dataloader()
            t0 = time.perf_counter()
            it = iter(loader)
            next(it)
            t1 = time.perf_counter()
            n = 0
            for batch in it:
                n += batch["image"].shape[0]
                if n >= batches * batch_size:
                    break
            t2 = time.perf_counter()
            del it, loader  # stop the workers before the next setting starts its own
            results.append({"workers": nw, "images": n, "seconds": round(t2 - t1, 4),
                            "images_per_s": round(n / max(t2 - t1, 1e-9), 1),
                            "first_batch_s": round(t1 - t0, 4), "skipped": dm.skipped_total()})
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"benchmark": "data", "shards": "synthetic 256x256 jpeg" if tmp else shards,
            "image_size": image_size, "batch_size": batch_size, "batches": batches,
            "pipeline": "tar read + jpeg decode + ADM centre crop + random flip + collate",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(), "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Data-loading throughput per DataLoader worker count.")
    p.add_argument("--shards", default=None, help="shard pattern (default: write synthetic shards)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON output file (default: print only)")
    a = p.parse_args(argv)
    result = bench_data(a.shards, a.image_size, tuple(int(w) for w in a.workers.split(",")), a.batches,
                        a.batch_size)
    for r in result["results"]:
        print(f"bench data: workers={r['workers']}: {r['images_per_s']:.0f} images/s "
              f"(first batch {r['first_batch_s']:.2f} s)")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"bench data: wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
