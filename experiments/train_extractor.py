"""Train a feature extractor for FID / IS / precision-recall: the embedded digits' CNN, or one for your own shards.

Deterministic on CPU (one thread, deterministic kernels, fixed seed and split): the same command gives the same
weights, so FID numbers computed with it stay comparable across runs. The digits CNN takes about 7 s on one core.

    python -m experiments.train_extractor --out runs/extractors/digits.safetensors
    python -m experiments.train_extractor --out runs/extractors/digits-s1.safetensors --seed 1 --epochs 30
    # your own labelled image shards (datamodules.shards), at the resolution you generate at:
    python -m experiments.train_extractor --shards 'shards/train-*.tar' --val-shards 'shards/val-*.tar' \
        --image-size 64 --out runs/extractors/photos.safetensors

Writes ``OUT`` (safetensors; config and, for shards, the domain it fits in its metadata) and ``OUT`` with
``.json`` (config, domain, seed, accuracy). Use it with ``--extractor shards --extractor-weights OUT``
(experiments.evaluate, experiments.eval_tokenizer) or ``eval.extractor=shards eval.extractor_weights=OUT`` (the FID
callback); it refuses samples of another resolution and references from another dataset. For ImageNet-scale data
use Inception (torch-fidelity's weights-inception-2015-12-05-6726825d.pth): this CNN loads its shards into memory.
"""
from __future__ import annotations

import argparse
import sys
import time

from lightning_modules.metrics.extractors import (DEFAULT_DIGITS_WEIGHTS, load_digits_extractor, load_extractor,
                                                  save_digits_extractor, train_digits_extractor)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.train_extractor", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help=f"weights file (digits default: {DEFAULT_DIGITS_WEIGHTS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--shards", default="", help="labelled image shards to train on (default: the embedded digits)")
    p.add_argument("--val-shards", default="", help="shards for the reported val accuracy")
    p.add_argument("--image-size", type=int, default=0, help="--shards: resolution (= the samples' resolution)")
    p.add_argument("--max-images", type=int, default=0, help="--shards: first N training images (0 = all)")
    a = p.parse_args(argv)
    t0 = time.time()
    if not a.shards:
        if a.val_shards or a.image_size or a.max_images:
            raise ValueError("--val-shards, --image-size and --max-images need --shards (the digits CNN has its own)")
        out = a.out or DEFAULT_DIGITS_WEIGHTS
        model, info = train_digits_extractor(seed=a.seed, epochs=a.epochs, log=print)
        info["train_time_s"] = round(time.time() - t0, 2)
        save_digits_extractor(model, out, info)
        name = load_digits_extractor(out).name  # round-trip check, and the name FID caches are keyed by
    else:
        from lightning_modules.metrics.shard_extractor import save_shard_extractor, train_shard_extractor

        if a.image_size < 8 or not a.out:
            raise ValueError("--shards needs --image-size S (>= 8: the resolution of the samples it will score) and "
                             "--out FILE")
        out = a.out
        model, info = train_shard_extractor(a.shards, a.image_size, a.val_shards, a.seed, a.epochs,
                                            max_images=a.max_images, log=print)
        info["train_time_s"] = round(time.time() - t0, 2)
        save_shard_extractor(model, out, info)
        name = load_extractor("shards", out).name
    val = f"val_accuracy={info['val_accuracy']:.4f} " if "val_accuracy" in info else ""
    print(f"{info['kind']} extractor {name}: {val}train_accuracy={info['train_accuracy']:.4f} "
          f"({info['train_time_s']:.1f}s) -> {out}")
    return dict(info, name=name)


def cli(argv: list[str] | None = None) -> int:
    """``roar-train-extractor``: main() returns the metrics (for tests and callers); a console script needs an exit
    code. Bad input is one line and exit 2."""
    try:
        main(argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"train_extractor: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
