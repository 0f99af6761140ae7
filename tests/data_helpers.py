"""Tar fixtures for the data tests (written inside each test), plus the 2-rank DDP script.

    python tests/data_helpers.py ddp OUT_DIR   # run by tests/test_data_ddp.py; Lightning re-launches it per rank
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from datamodules.shards import write_tar  # noqa: E402


def image_bytes(value: int, size: int = 8, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small image of one flat colour (value), so decoded pixels are predictable even through JPEG."""
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    out = io.BytesIO()
    Image.fromarray(np.full(shape, value, np.uint8)).save(out, format=fmt)
    return out.getvalue()


def make_sample(key: str, label: int, kind: str = "ok", size: int = 8) -> dict:
    """kind: ok | garbage_jpg (not an image) | cut_jpg (JPEG cut in half) | bad_cls | no_cls."""
    jpg = image_bytes(label * 20, size)
    sample = {"__key__": key, "jpg": jpg, "cls": label}
    if kind == "garbage_jpg":
        sample["jpg"] = b"this is not a jpeg"
    elif kind == "cut_jpg":
        sample["jpg"] = jpg[: len(jpg) // 2]
    elif kind == "bad_cls":
        sample["cls"] = "seven"
    elif kind == "no_cls":
        del sample["cls"]
    elif kind != "ok":
        raise ValueError(kind)
    return sample


def make_shards(folder: str, n_shards: int, per_shard: int, prefix: str = "train", bad: dict | None = None,
                size: int = 8, manifest: bool = True) -> str:
    """Shards "{prefix}-%06d.tar" of keys "s{shard}_{i}" (label i % 10); bad = {(shard, i): kind}.

    Writes "{prefix}-manifest.json" with the planned counts (bad samples included, as a real writer would).
    Returns the brace pattern.
    """
    bad = bad or {}
    os.makedirs(folder, exist_ok=True)
    counts = {}
    for s in range(n_shards):
        name = f"{prefix}-{s:06d}.tar"
        counts[name] = write_tar(os.path.join(folder, name), [
            make_sample(f"s{s}_{i:03d}", i % 10, bad.get((s, i), "ok"), size) for i in range(per_shard)])
    if manifest:
        with open(os.path.join(folder, f"{prefix}-manifest.json"), "w") as f:
            json.dump({"num_samples": sum(counts.values()), "shards": counts}, f)
    return os.path.join(folder, f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


def truncate_inside(path: str, member: str, keep: int = 10) -> None:
    """Cut a tar file ``keep`` bytes into the data of ``member`` (as a crashed copy would)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    with open(path, "r+b") as f:
        f.truncate(offset + keep)


def make_code_shards(folder: str, n_shards: int, per_shard: int, grid=(2, 3), n_aug: int = 4, vocab: int = 16,
                     fingerprint: str = "abcd1234abcd1234", bad: dict | None = None) -> str:
    """Code shards: variant v of every sample is a grid filled with v, so codes[0, 0] names the variant picked.

    bad = {(shard, i): "grid" | "range"} writes a wrongly shaped or out-of-vocabulary sample.
    """
    bad = bad or {}
    os.makedirs(folder, exist_ok=True)
    counts = {}
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            arr = np.broadcast_to(np.arange(n_aug, dtype=np.int16)[:, None, None], (n_aug, *grid)).copy()
            if bad.get((s, i)) == "grid":
                arr = arr[:, :1]
            elif bad.get((s, i)) == "range":
                arr[:, 0, 0] = vocab
            buf = io.BytesIO()
            np.save(buf, arr)
            samples.append({"__key__": f"c{s}_{i:03d}", "codes.npy": buf.getvalue(), "cls": i % 10})
        name = f"codes-{s:06d}.tar"
        counts[name] = write_tar(os.path.join(folder, name), samples)
    manifest = {"num_samples": sum(counts.values()), "shards": counts,
                "tokenizer": {"kind": "pixel", "fingerprint": fingerprint, "config": {}, "vocab_size": vocab},
                "grid": list(grid), "crop_policy": "adm_center+flip", "num_variants": n_aug}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return os.path.join(folder, f"codes-{{000000..{n_shards - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- 2-rank DDP run
def run_ddp(out: str) -> None:
    """Lightning DDP on CPU, 2 ranks x 2 workers: each rank records the keys it trained and validated on."""
    import lightning as L
    import torch

    from datamodules.images import ImageShardDataModule
    from lightning_modules.callbacks.data_stats import DataStatsCallback

    class KeyRecorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_keys: dict[int, list[str]] = {}
            self.val_keys: list[str] = []

        def training_step(self, batch, batch_idx):
            self.train_keys.setdefault(self.current_epoch, []).extend(batch["_key"])
            return (self.w * batch["image"].float().mean()).sum()

        def validation_step(self, batch, batch_idx):
            self.val_keys.extend(batch["_key"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = os.path.join(out, "data")
    dm = ImageShardDataModule(os.path.join(data, "train-{000000..000007}.tar"),
                              os.path.join(data, "val-{000000..000002}.tar"), batch_size=4, num_workers=2,
                              image_size=8, samples_per_epoch=64, seed=3, center_crop="none")
    model, stats = KeyRecorder(), DataStatsCallback(every_n_batches=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[stats])
    trainer.fit(model, datamodule=dm)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"train": model.train_keys, "val": model.val_keys, "dm_skipped": dm.skipped_total(),
                   "cb_skipped": stats.final_skipped, "cb_images": stats.final_images_seen,
                   "world": trainer.world_size, "len": len(trainer.train_dataloader)}, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["ddp"]:
        run_ddp(sys.argv[2])
