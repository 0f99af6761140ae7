"""Score any tokenizer on your val shards: PSNR and rFID (reconstruction FID) with an extractor that fits the data.

    python -m experiments.eval_tokenizer --tokenizer-kind llamagen_vq --tokenizer-path runs/photo_vq/tokenizer.safetensors \
        --shards 'shards/val-*.tar' --image-size 64 --extractor shards \
        --extractor-weights runs/extractors/photos.safetensors --out runs/photo_vq/val_eval.json

The same numbers ``experiments.train_tokenizer`` reports at the end of training (the first --count val images, ADM
centre crop), so a VQ trained on your images and one trained elsewhere (e.g. the digits VQ) compare directly. The
extractor is refused when it was trained on another domain or resolution (shard_extractor.check_domain).
"""
from __future__ import annotations

import argparse
import sys

from experiments.cli import write_json


def evaluate_tokenizer(tokenizer, shards: str, image_size: int, extractor_kind: str, extractor_weights: str,
                       count: int = 1000) -> dict:
    from experiments.train_tokenizer import evaluate
    from lightning_modules.callbacks.rfid import reconstruction_fid
    from lightning_modules.metrics.extractors import load_extractor
    from lightning_modules.metrics.shard_extractor import check_domain, shard_images

    extractor = None if extractor_kind == "none" else load_extractor(extractor_kind, extractor_weights)
    if extractor is not None:
        check_domain(extractor, image_size, shards)
    images, _ = shard_images(shards, image_size, count)
    metrics, rec = evaluate(tokenizer, images)
    metrics["val_rfid"] = reconstruction_fid(extractor, images, rec) if extractor is not None else None
    metrics.update({"rfid_images": len(images), "rfid_extractor": extractor.name if extractor else "none",
                    "shards": shards, "image_size": image_size, "fingerprint": tokenizer.fingerprint,
                    "grid": list(tokenizer.grid(image_size, image_size)), "vocab_size": tokenizer.vocab_size})
    return metrics


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.eval_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer-kind", required=True, help="tokenizers.registry kind, e.g. llamagen_vq")
    p.add_argument("--tokenizer-path", default="", help="its local weights file")
    p.add_argument("--shards", required=True, help="val image shards (pattern)")
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--extractor", default="shards", choices=("shards", "inception", "digits", "none"))
    p.add_argument("--extractor-weights", default="")
    p.add_argument("--count", type=int, default=1000, help="the first N val images")
    p.add_argument("--out", default="", help="metrics JSON to write")
    a = p.parse_args(argv)
    from tokenizers.registry import build_tokenizer

    tok = build_tokenizer(a.tokenizer_kind, **({"path": a.tokenizer_path} if a.tokenizer_path else {}))
    metrics = evaluate_tokenizer(tok, a.shards, a.image_size, a.extractor, a.extractor_weights, a.count)
    metrics["tokenizer_path"] = a.tokenizer_path
    rfid = "n/a" if metrics["val_rfid"] is None else f"{metrics['val_rfid']:.2f}"
    print(f"{a.tokenizer_path or a.tokenizer_kind}: val PSNR {metrics['val_psnr']:.2f} dB, rFID {rfid} "
          f"({metrics['rfid_images']} images of {a.shards}, extractor {metrics['rfid_extractor']})")
    if a.out:
        write_json(a.out, metrics)
    return metrics


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"eval_tokenizer: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
