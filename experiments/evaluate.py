"""Score a sample file: FID, Inception Score and k-NN precision/recall -> metrics.json.

Samples: an ADM-format .npz (``arr_0`` uint8 [N, H, W, 3], as written by the sampler; streamed, never fully in
memory) or a folder of PNGs. Reference: an ADM reference batch / cached .npz, ``digits[:split]``, or a shard
pattern (stats computed at the samples' resolution once, then cached in --cache-dir).

    # ImageNet 256, ADM protocol (Inception weights are local only: --extractor-weights = eval.inception_weights)
    python -m experiments.evaluate --samples runs/rar-B/samples-50k.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --extractor inception --extractor-weights weights/weights-inception-2015-12-05-6726825d.pth \
        --out runs/rar-B/metrics.json
    # embedded digits (extractor from `python -m experiments.train_extractor`)
    python -m experiments.evaluate --samples runs/digits/samples.npz --ref digits --extractor digits \
        --out runs/digits/metrics.json
    # your own images: an extractor trained on your shards (experiments.train_extractor --shards), val shards as ref
    python -m experiments.evaluate --samples S.npz --ref 'shards/val-*.tar' --extractor shards \
        --extractor-weights runs/extractors/photos.safetensors --out metrics.json

The Inception file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (README: "Weights and
reference files"); the ADM reference batch ``VIRTUAL_imagenet256_labeled.npz`` is from guided-diffusion's evaluation
suite. An extractor trained on another domain or resolution than the samples or the reference is refused (one line:
e.g. the digits CNN on 64 px photos). Numbers from a non-ADM extractor or reference are not comparable with papers:
the JSON records both.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from experiments.cli import write_json
from lightning_modules.metrics.extractors import KINDS, load_extractor
from lightning_modules.metrics.reference import NpzImages, extract_stats, png_folder, resolve_reference
from lightning_modules.metrics.scores import IS_SPLITS, PR_K, fid_from_stats, precision_recall

from lightning_modules.metrics.extractors import DEFAULT_DIGITS_WEIGHTS  # noqa: E402

DEFAULT_WEIGHTS = {"digits": DEFAULT_DIGITS_WEIGHTS, "inception": "", "shards": ""}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC) or a folder of PNGs")
    p.add_argument("--ref", required=True, help="reference .npz, 'digits[:train|val]', or a shard pattern")
    p.add_argument("--extractor", choices=KINDS, default="inception")
    p.add_argument("--extractor-weights", default=None,
                   help="local weights file (inception: eval.inception_weights, torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth; shards: experiments.train_extractor --shards; "
                        f"digits: default {DEFAULT_WEIGHTS['digits']})")
    p.add_argument("--out", default="", help="metrics.json to write (optional)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=".cache/fid_refs", help="reference statistics cache ('' = no cache)")
    p.add_argument("--ref-count", type=int, default=0, help="shard references: first N images (0 = all)")
    p.add_argument("--ref-image-size", type=int, default=0, help="shard references: crop size (0 = samples' H)")
    p.add_argument("--num-splits", type=int, default=IS_SPLITS, help="IS splits (ADM: 10)")
    p.add_argument("--no-pr", action="store_true", help="skip precision/recall (the k-NN part is O(N * M))")
    return p.parse_args(argv)


def open_samples(path: str) -> tuple[int, tuple[int, ...], callable]:
    """-> (count, image shape HWC, batches(batch_size) -> iterator of uint8 [b, H, W, C] arrays)."""
    if os.path.isdir(path):
        images = png_folder(path)
        return len(images), images.shape[1:], lambda bs: (images[i:i + bs] for i in range(0, len(images), bs))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--samples: not found: {path}")
    if not path.endswith(".npz"):
        raise ValueError(f"--samples: expected an .npz (arr_0 uint8 NHWC) or a folder of PNGs, got {path}")
    arr = NpzImages(path, "arr_0")
    return len(arr), arr.shape[1:], arr.batches


def evaluate(samples: str, ref: str, extractor_kind: str = "inception", extractor_weights: str | None = None,
             batch_size: int = 100, device: str = "cpu", cache_dir: str = ".cache/fid_refs", ref_count: int = 0,
             ref_image_size: int = 0, num_splits: int = IS_SPLITS, pr: bool = True) -> dict:
    t0 = time.time()
    weights = DEFAULT_WEIGHTS[extractor_kind] if extractor_weights is None else extractor_weights
    if extractor_kind == "digits" and weights == DEFAULT_DIGITS_WEIGHTS:
        from experiments.fid_setup import ensure_digits_extractor

        ensure_digits_extractor(weights)  # the default one is trained (deterministic, seconds) when missing
    extractor = load_extractor(extractor_kind, weights, device)     # fails before any heavy work
    count, shape, batches = open_samples(samples)
    from lightning_modules.metrics.shard_extractor import check_domain

    if int(shape[0]) != int(shape[1]):
        raise ValueError(f"--samples: {samples} holds {shape[0]}x{shape[1]} images; square images are expected")
    check_domain(extractor, int(shape[0]), ref, next(iter(batches(16))))  # an extractor that fits the data, or none
    reference = resolve_reference(ref, extractor, image_size=ref_image_size or int(shape[0]), count=ref_count,
                                  cache_dir=cache_dir or None, batch_size=batch_size, need_features=pr)
    stats, feats = extract_stats(extractor, batches(batch_size), total=count, keep_features=count if pr else 0,
                                 with_is=True, num_splits=num_splits, progress="evaluate: sample features")
    fid = fid_from_stats(stats["mu"], stats["sigma"], reference.mu, reference.sigma)
    precision = recall = None
    if pr and reference.features is not None:
        precision, recall = precision_recall(torch.from_numpy(reference.features).to(device),
                                             torch.from_numpy(feats).to(device), k=PR_K)
    return {
        "samples": os.path.abspath(samples), "num_samples": int(stats["num_samples"]), "image_shape": list(shape),
        "extractor": extractor.name, "extractor_kind": extractor_kind,
        "extractor_weights": os.path.abspath(weights) if weights else "",
        "reference": {"spec": ref, "source": reference.source, "num_samples": reference.num_samples,
                      "extractor": reference.extractor or "unrecorded (ADM reference)",
                      "pr_features": 0 if reference.features is None else int(len(reference.features))},
        "fid": fid, "is": stats.get("is"), "is_std": stats.get("is_std"), "is_splits": num_splits,
        "precision": precision, "recall": recall, "pr_k": PR_K,
        "pr_note": None if precision is not None else ("skipped (--no-pr)" if not pr else
                                                       "reference has no images/features for precision/recall"),
        "time_s": round(time.time() - t0, 2),
    }


def summary_line(m: dict) -> str:
    pr = (f"precision={m['precision']:.4f} recall={m['recall']:.4f}" if m["precision"] is not None
          else "precision/recall=n/a")
    return (f"fid={m['fid']:.4f} is={m['is']:.4f}±{m['is_std']:.4f} {pr} | n={m['num_samples']} "
            f"extractor={m['extractor']} ref={m['reference']['source']} ({m['time_s']:.1f}s)")


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    metrics = evaluate(a.samples, a.ref, a.extractor, a.extractor_weights, a.batch_size, a.device, a.cache_dir,
                       a.ref_count, a.ref_image_size, a.num_splits, not a.no_pr)
    print(summary_line(metrics))
    if a.out:
        write_json(a.out, metrics)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """``roar-evaluate`` / ``python -m experiments.evaluate``: main() with an exit code instead of the metrics."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, KeyError) as e:  # config/file problems: one line, no traceback
        hint = (" [CLI flags: eval.reference = --ref, eval.extractor_weights / eval.inception_weights = "
                "--extractor-weights]" if "eval." in str(e) else "")
        print(f"evaluate: error: {e}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
