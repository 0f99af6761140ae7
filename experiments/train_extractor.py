"""Train the digits feature extractor used for FID / IS / precision-recall on the embedded 8x8 digits.

Deterministic on CPU (one thread, deterministic kernels, fixed seed and split): the same command gives the same
weights, so FID numbers computed with it stay comparable across runs. About 7 s on one core.

    python -m experiments.train_extractor --out runs/extractors/digits.safetensors
    python -m experiments.train_extractor --out runs/extractors/digits-s1.safetensors --seed 1 --epochs 30

Writes ``OUT`` (safetensors; the config sits in its metadata) and ``OUT`` with ``.json`` (config, seed, accuracy).
"""
from __future__ import annotations

import argparse
import time

from lightning_modules.metrics.extractors import load_digits_extractor, save_digits_extractor, train_digits_extractor


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.train_extractor", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/extractors/digits.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    a = p.parse_args(argv)
    t0 = time.time()
    model, info = train_digits_extractor(seed=a.seed, epochs=a.epochs, log=print)
    info["train_time_s"] = round(time.time() - t0, 2)
    save_digits_extractor(model, a.out, info)
    name = load_digits_extractor(a.out).name  # round-trip check, and the name FID caches are keyed by
    print(f"digits extractor {name}: val_accuracy={info['val_accuracy']:.4f} "
          f"train_accuracy={info['train_accuracy']:.4f} ({info['train_time_s']:.1f}s) -> {a.out}")
    return dict(info, name=name)


def cli(argv: list[str] | None = None) -> int:
    """``roar-train-extractor``: main() returns the metrics (for tests and callers); a console script needs an exit code."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
