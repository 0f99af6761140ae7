"""Reference statistics for FID / precision-recall, and the readers shared with ``experiments.evaluate``.

A reference is ``RefStats(mu [F], sigma [F, F], num_samples, extractor, source, features [M, F] | None)``; the
optional features (at most ``max_features``, 10k like ADM's reference batch) feed precision/recall. Sources
(``resolve_reference(spec, ...)``):

* ``*.npz``: an ADM reference batch (``mu``, ``sigma``; optional ``arr_0`` uint8 NHWC images, run through the
  extractor for P/R features) or a file this module cached (``mu``, ``sigma``, ``num_samples``, ``extractor``,
  optional ``features``). Keys and shapes are validated; errors name the file and the key.
* ``digits`` / ``digits:train`` / ``digits:val``: the embedded 8x8 digits (train split by default: what the
  generator learns, as ADM's reference is ImageNet train).
* anything else: WebDataset shard pattern(s) (``{000..009}`` braces, globs, comma-separated) with ``png``/``jpg``
  images, centre-cropped ADM-style to ``image_size``. Computed once, cached in ``cache_dir`` under a name keyed
  by (shard names + sizes, extractor name, image size, count).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from lightning_modules.metrics.scores import IS_SPLITS, FeatureStats

class NpzKeyError(KeyError):
    """A missing .npz key; prints its message plainly (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


MAX_PR_FEATURES = 10_000    # ADM's reference batch holds 10k images for precision/recall
CACHE_VERSION = 1


@dataclasses.dataclass
class RefStats:
    mu: np.ndarray                      # [F] float64
    sigma: np.ndarray                   # [F, F] float64
    num_samples: int
    extractor: str                      # extractor name; "" when unknown (ADM reference files)
    source: str                         # file or spec it came from
    features: np.ndarray | None = None  # [M, F] float32, for precision/recall

    def check(self, extractor) -> "RefStats":
        """Refuse statistics made by another extractor (dims always; name when the file records one)."""
        if self.mu.shape[0] != extractor.num_features:
            raise ValueError(f"{self.source}: reference has {self.mu.shape[0]}-d statistics but extractor "
                             f"{extractor.name} gives {extractor.num_features}-d features")
        if self.extractor and self.extractor != extractor.name:
            raise ValueError(f"{self.source}: statistics were computed with extractor {self.extractor!r}, "
                             f"not {extractor.name!r} (delete the cache file to recompute)")
        return self


# ----------------------------------------------------------------------------------------------------------------
# Images: ADM .npz (streamed), PNG folders, uint8 batches
# ----------------------------------------------------------------------------------------------------------------
class NpzImages:
    """``arr_0`` of an ADM .npz, read batch by batch straight from the zip (50k x 256^2 x 3 is 10 GB in RAM)."""

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = path, key
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                found = sorted(n[:-4] for n in zf.namelist())
                raise NpzKeyError(f"{path}: missing key {key!r} (found keys: {found})")
            with zf.open(f"{key}.npy") as f:
                self.shape, self.dtype = self._header(f)
        channels_ok = len(self.shape) == 3 or (len(self.shape) == 4 and self.shape[3] in (1, 3))
        if self.dtype != np.uint8 or not channels_ok:
            raise ValueError(f"{path}: key {key!r} must be uint8 [N, H, W, 3] (NHWC), got {self.dtype} {self.shape}")

    @staticmethod
    def _header(f) -> tuple[tuple, np.dtype]:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        shape, fortran, dtype = read(f) if read else fmt._read_array_header(f, version)
        if fortran:
            raise ValueError("Fortran-ordered arrays are not supported")  # ADM writes C order
        return tuple(shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Yield uint8 [b, H, W(, C)] arrays in file order."""
        n = len(self) if limit is None else min(limit, len(self))
        per = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            self._header(f)
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                buf = f.read(b * per)
                yield np.frombuffer(buf, np.uint8).reshape((b,) + self.shape[1:])


def to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] / [N, H, W, C] (C in 1, 3) -> uint8 [N, 3, H, W]."""
    # np.require copies read-only buffers (np.frombuffer batches) that torch refuses to wrap
    x = torch.as_tensor(np.require(images, requirements=["C", "W"]) if isinstance(images, np.ndarray) else images)
    if x.dim() == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def png_folder(path: str) -> np.ndarray:
    """All ``*.png`` in a folder, sorted by name -> uint8 [N, H, W, 3]."""
    from PIL import Image

    files = sorted(glob.glob(os.path.join(path, "*.png")))
    if not files:
        raise FileNotFoundError(f"{path}: no .png files in this folder")
    from datamodules.transforms import to_rgb

    return np.stack([np.array(to_rgb(Image.open(p))) for p in files])


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's preprocessing: box-halve while >= 2x, bicubic resize of the short side, centre crop -> uint8 HWC."""
    from PIL import Image

    from datamodules.transforms import to_rgb

    img = to_rgb(pil_image)
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def extract_stats(extractor, batches: Iterable[np.ndarray | torch.Tensor], total: int = 0, keep_features: int = 0,
                  with_is: bool = False, num_splits: int = IS_SPLITS,
                  progress: str = "") -> tuple[dict, np.ndarray | None]:
    """Run ``extractor`` over uint8 batches (NHWC arrays or NCHW tensors) -> (FeatureStats.compute(), features).

    Local only (``sync_on_compute=False``): every rank that calls this sees the whole set, so summing across
    ranks would double count. ``features`` keeps the first ``keep_features`` rows (float32) for P/R.
    ``progress``: a label to report progress under (lightning_modules/progress.py); "" = silent.
    """
    from lightning_modules.progress import Progress

    metric = FeatureStats(extractor.num_features, extractor.num_classes if with_is else 0, total=total,
                          num_splits=num_splits, sync_on_compute=False).to(extractor.device)
    kept, offset = [], 0
    with Progress(total or None, progress, "images", enabled=bool(progress)) as bar:
        for b in batches:
            x = to_nchw(b) if isinstance(b, np.ndarray) else b
            feats, logits = extractor.features_and_logits(x)
            idx = torch.arange(offset, offset + len(x), device=feats.device)
            metric.update(feats, logits if with_is else None, idx if with_is else None)
            if offset < keep_features:
                kept.append(feats[:keep_features - offset].float().cpu())
            offset += len(x)
            bar.update(len(x))
    if offset == 0:
        raise ValueError("no images to extract features from")
    return metric.compute(), (torch.cat(kept).numpy() if kept else None)


# ----------------------------------------------------------------------------------------------------------------
# .npz references
# ----------------------------------------------------------------------------------------------------------------
def save_reference_npz(path: str, ref: RefStats) -> None:
    """Atomic write (tmp + rename): several ranks may compute the same cache entry at once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"mu": ref.mu, "sigma": ref.sigma, "num_samples": np.int64(ref.num_samples),
              "extractor": np.str_(ref.extractor)}
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _cache_path(cache_dir: str | None, tag: str, extractor, key: dict) -> str | None:
    if not cache_dir:
        return None
    digest = hashlib.sha1(json.dumps(dict(key, v=CACHE_VERSION), sort_keys=True).encode()).hexdigest()[:10]
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)[:40] or "ref"
    return os.path.join(cache_dir, f"ref-{tag}-{extractor.name}-{digest}.npz")


def load_reference_npz(path: str, extractor=None, need_features: bool = False, batch_size: int = 100,
                       cache_dir: str | None = None, max_features: int = MAX_PR_FEATURES,
                       show_progress: bool = True) -> RefStats:
    """Read an ADM reference batch or a cached reference; validated against ``extractor`` when given."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval.reference: reference file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        for key in ("mu", "sigma"):
            if key not in keys:
                raise NpzKeyError(f"{path}: missing key {key!r} (a reference .npz needs 'mu' [F] and 'sigma' [F, F]; "
                               f"found keys: {sorted(keys)})")
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        if mu.ndim != 1:
            raise ValueError(f"{path}: key 'mu' must be 1-d [F], got shape {mu.shape}")
        if sigma.shape != (mu.shape[0],) * 2:
            raise ValueError(f"{path}: key 'sigma' must be [{mu.shape[0]}, {mu.shape[0]}], got shape {sigma.shape}")
        num = int(z["num_samples"]) if "num_samples" in keys else 0
        name = str(z["extractor"]) if "extractor" in keys else ""
        feats = np.asarray(z["features"], np.float32) if "features" in keys else None
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != mu.shape[0]):
        raise ValueError(f"{path}: key 'features' must be [M, {mu.shape[0]}], got shape {feats.shape}")
    ref = RefStats(mu, sigma, num, name, path, feats)
    if extractor is None:
        return ref
    ref.check(extractor)
    if need_features and ref.features is None and "arr_0" in keys:
        ref.features = _adm_image_features(path, extractor, batch_size, cache_dir, max_features, show_progress)
    return ref


def _adm_image_features(path: str, extractor, batch_size: int, cache_dir: str | None, limit: int,
                        show_progress: bool = True) -> np.ndarray:
    """P/R features of an ADM reference's ``arr_0`` images (10k Inception passes: cached when cache_dir is set)."""
    images = NpzImages(path)
    st = os.stat(path)
    cache = _cache_path(cache_dir, "arr0-" + os.path.basename(path), extractor,
                        {"file": os.path.basename(path), "size": st.st_size, "mtime": st.st_mtime_ns,
                         "extractor": extractor.name, "limit": limit})
    if cache and os.path.isfile(cache):
        with np.load(cache) as z:
            return np.asarray(z["features"], np.float32)
    n = min(limit, len(images))
    stats, feats = extract_stats(extractor, images.batches(batch_size, n), total=n, keep_features=n,
                                 progress=f"reference features ({os.path.basename(path)})" if show_progress else "")
    if cache:
        save_reference_npz(cache, RefStats(stats["mu"], stats["sigma"], n, extractor.name, path, feats))
    return feats


# ----------------------------------------------------------------------------------------------------------------
# Computed references: embedded digits, WebDataset shards
# ----------------------------------------------------------------------------------------------------------------
def reference_from_images(images: Callable[[], Iterable[np.ndarray]], extractor, source: str,
                          cache: str | None = None, max_features: int = MAX_PR_FEATURES, total: int = 0,
                          show_progress: bool = True) -> RefStats:
    """Stats of a set of real images, through the cache when ``cache`` names a file. ``images()`` yields batches
    (``total`` of them when known, for the progress line)."""
    if cache and os.path.isfile(cache):
        return load_reference_npz(cache, extractor)
    stats, feats = extract_stats(extractor, images(), total=total, keep_features=max_features,
                                 progress=f"reference stats ({source})" if show_progress else "")
    ref = RefStats(stats["mu"], stats["sigma"], stats["num_samples"], extractor.name, source, feats)
    if cache:
        save_reference_npz(cache, ref)
    return ref


def digits_reference(extractor, split: str = "train", batch_size: int = 256, show_progress: bool = False) -> RefStats:
    """Embedded digits; cheap (1.4k images of 8x8), so never cached (and no progress line by default)."""
    from datamodules.digits import digits_arrays

    images, _ = digits_arrays(split)                              # uint8 [n, 8, 8]
    batches = lambda: (images[i:i + batch_size] for i in range(0, len(images), batch_size))  # noqa: E731
    return reference_from_images(batches, extractor, f"digits:{split}", total=len(images), show_progress=show_progress)


def expand_shards(pattern: str) -> list[str]:
    """'a-{000..009}.tar', 'a-{000,003}.tar', globs and comma-separated lists -> existing shard paths (sorted within a
    glob). Commas inside braces are brace alternatives, not list separators."""
    from datamodules.wds_utils import check_shards_exist, expand_shards as expand

    parts, depth, start = [], 0, 0
    for i, c in enumerate(pattern + ","):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    try:
        urls = [u for part in parts if part for u in expand(part, "eval.reference")]
        check_shards_exist(urls, "eval.reference")
    except ValueError as err:  # braceexpand: "Unbalanced braces"
        raise FileNotFoundError(f"eval.reference: no shard files for {pattern!r} ({err})") from None
    return urls


def decoded_shard_images(urls: list[str], image_size: int, skipped: list[str], crop: str = "adm",
                         labels: bool = False) -> Iterator[tuple[np.ndarray, int | None]]:
    """(uint8 [S, S, 3], label or None) of each readable sample of the shards, in file order (no shuffle: a
    reference or an extractor's data must not depend on a seed). ``crop``: adm (the ADM centre crop, what the
    pretokenizer encodes) or none (a square resize, the image DataModule's center_crop=none). A corrupt sample or
    tar (and, with ``labels``, a sample without a readable cls) is skipped and noted in ``skipped``."""
    from PIL import Image

    from datamodules.shards import iter_tar_samples
    from datamodules.transforms import resize_square, to_rgb

    for url in urls:
        for sample in iter_tar_samples(url, skipped.append):
            data = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            try:
                label = int(sample["cls"].decode("ascii").strip()) if labels else None
                if data is None:
                    raise ValueError("no png/jpg entry")
                pil = Image.open(io.BytesIO(data))
                image = (center_crop_arr(pil, image_size) if crop == "adm"
                         else np.asarray(resize_square(to_rgb(pil), image_size)))
            except Exception as exn:  # noqa: BLE001 - a broken sample is skipped and counted, not fatal
                skipped.append(f"{url}:{sample.get('__key__')}: {type(exn).__name__}: {str(exn)[:80]}")
                continue
            yield image, label


def _shard_images(urls: list[str], image_size: int, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of the first ``count`` (0 = all) images of the shards; every rank reads them all. Corrupt samples
    are skipped and counted (one line at the end), as everywhere else."""
    buf, seen, skipped = [], 0, []
    for image, _ in decoded_shard_images(urls, image_size, skipped):
        buf.append(image)
        seen += 1
        if len(buf) == batch_size or seen == count:
            yield np.stack(buf)
            buf = []
        if seen == count:
            break
    if buf:
        yield np.stack(buf)
    if skipped:
        print(f"reference: skipped {len(skipped)} corrupt sample(s), e.g. {skipped[0]}", file=sys.stderr)


def shard_reference(pattern: str, extractor, image_size: int, count: int = 0, cache_dir: str | None = None,
                    batch_size: int = 100, max_features: int = MAX_PR_FEATURES, show_progress: bool = True) -> RefStats:
    """Stats of the first ``count`` images (0 = all) of the shards, cached by (shards, extractor, size, count)."""
    urls = expand_shards(pattern)
    key = {"shards": [(os.path.basename(u), os.path.getsize(u)) for u in urls], "extractor": extractor.name,
           "image_size": image_size, "count": count}
    # "train-000000.tar".."train-000009.tar" -> "train": the shard numbers are in the hashed key already
    tag = os.path.commonprefix([os.path.basename(u) for u in urls]).rstrip("0123456789-_.") or "shards"
    cache = _cache_path(cache_dir, f"{tag}-{image_size}px-n{count or 'all'}", extractor, key)
    return reference_from_images(lambda: _shard_images(urls, image_size, count, batch_size), extractor, pattern,
                                 cache, max_features, total=count, show_progress=show_progress)


def resolve_reference(spec: str, extractor, *, image_size: int = 256, count: int = 0,
                      cache_dir: str | None = ".cache/fid_refs", batch_size: int = 100,
                      need_features: bool = True, show_progress: bool = True) -> RefStats:
    """``spec``: an .npz file, ``digits[:split]``, or a shard pattern (see module docstring). ``show_progress``:
    report the feature extraction of a reference set (lightning_modules/progress.py; the digits take a second)."""
    if not spec:
        raise ValueError("eval.reference is empty: give an ADM/cached .npz, 'digits', or a shard pattern")
    if spec.endswith(".npz"):
        return load_reference_npz(spec, extractor, need_features, batch_size, cache_dir, show_progress=show_progress)
    if spec == "digits" or spec.startswith("digits:"):
        return digits_reference(extractor, spec.partition(":")[2] or "train")
    return shard_reference(spec, extractor, image_size, count, cache_dir, batch_size,
                           show_progress=show_progress).check(extractor)
