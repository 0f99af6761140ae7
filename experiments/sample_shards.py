"""Sharded sample sets on disk: one file per protocol batch, written atomically; merged by streaming.

    <out>/<name>.shards/batch-000017.npz   images uint8 [n, H, W, 3], codes long [n, h, w], labels [n], samples [n]
    <out>/<name>.shards/inputs.json         everything that determines the images, and its fingerprint
    <out>/<name>.npz                        the ADM file: arr_0 uint8 [N, H, W, 3] (+ labels), written shard by shard

A batch whose shard exists is done: a killed run, started again with the same command, redoes only the missing
ones. A shard is only reused when the folder's inputs.json holds the same fingerprint (weights, tokenizer, classes,
every sample setting, seed, ...): the name carries the fingerprint's head, so other inputs get another folder, and
``claim_folder`` refuses the rare folder that still disagrees (one made before fingerprints, a hash-head clash).
Nothing ever holds the whole set (50,000 images at 256 px are 9.8 GB): every rank keeps one batch, and the merge
copies one shard at a time into the .npz (a zip of .npy files that we write as a stream; ``np.load`` reads it like
any other).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import zipfile

import numpy as np

SHARD = "batch-{:06d}.npz"
INPUTS = "inputs.json"


class ForeignShards(ValueError):
    """A shard folder whose shards other (or unrecorded) inputs made."""


def weights_digest(module) -> str:
    """sha256 over the backbone's tensors as loaded (EMA or live, any dtype): the checkpoint's identity by content,
    so a copied or re-saved file is the same set and another step, run or weights choice is not (a path, size or
    mtime says neither). About a second per GB, once per command."""
    import torch

    h = hashlib.sha256()
    for key, value in sorted(module.backbone.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes: no float conversion, bf16 included
    return h.hexdigest()


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim_folder(folder: str, inputs: dict) -> str:
    """Record ``inputs`` (and their fingerprint) in ``folder``, or check the ones there; returns the fingerprint.
    Raises ForeignShards (one line naming the folder) when shards exist that other or unknown inputs made: reusing
    them would merge another model's images under this command's record."""
    fp = fingerprint(inputs)
    path = os.path.join(folder, INPUTS)
    had_shards = bool(done_batches(folder))  # looked at first: a claimant writes inputs.json before its first shard
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f).get("fingerprint")
        if found != fp:
            raise ForeignShards(f"{folder}: its shards were made by other inputs (fingerprint {found}, this command's "
                             f"{fp}); remove the folder or use another --out")
        return fp
    if had_shards:
        raise ForeignShards(f"{folder}: holds shards without {INPUTS} (made by an older roar?), so they cannot be "
                         f"checked against this command; remove the folder or use another --out")
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # every rank writes the same text; a per-process name keeps writes apart
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fp, "inputs": inputs}, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)
    return fp


def shard_dir(out: str, name: str) -> str:
    return os.path.join(out, f"{name}.shards")


def shard_path(folder: str, batch: int) -> str:
    return os.path.join(folder, SHARD.format(batch))


def write_shard(folder: str, batch: int, **arrays: np.ndarray) -> str:
    """Atomic: a shard is either absent or complete (a kill mid-write leaves only a .tmp, ignored and replaced)."""
    os.makedirs(folder, exist_ok=True)
    path = shard_path(folder, batch)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def done_batches(folder: str) -> set[int]:
    return {int(os.path.basename(p)[6:12]) for p in glob.glob(os.path.join(folder, "batch-*.npz"))
            if not p.endswith(".tmp.npz")}


def read_shard(folder: str, batch: int) -> dict[str, np.ndarray]:
    with np.load(shard_path(folder, batch)) as z:
        return {k: z[k] for k in z.files}


def _write_npy_stream(zf: zipfile.ZipFile, name: str, shape: tuple, dtype, chunks) -> None:
    """One .npy member of an .npz, written from an iterator of C-contiguous chunks (their rows add up to shape[0])."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    rows = 0
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            rows += chunk.shape[0]
            f.write(chunk.tobytes())
    if rows != shape[0]:
        raise ValueError(f"{name}: wrote {rows} rows, expected {shape[0]}")


def merge_shards(folder: str, batches: list[int], npz: str) -> int:
    """Stream the shards of ``batches`` (in this order) into ``npz`` (arr_0 images, labels); returns the count."""
    first = read_shard(folder, batches[0])
    sizes = []
    for b in batches:
        with np.load(shard_path(folder, b)) as z:  # only the member headers are read here
            sizes.append(z["labels"].shape[0])
    total = sum(sizes)
    image_shape = (total, *first["images"].shape[1:])
    tmp = f"{npz}.tmp.npz"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npy_stream(zf, "arr_0", image_shape, np.uint8, (read_shard(folder, b)["images"] for b in batches))
        _write_npy_stream(zf, "labels", (total,), np.int64, (read_shard(folder, b)["labels"] for b in batches))
    os.replace(tmp, npz)
    return total
