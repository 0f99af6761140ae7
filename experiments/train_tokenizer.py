"""Train a LlamaGen-layout VQ tokenizer: on the embedded digits (CPU, ~2 minutes) or on your own image shards.

    python -m experiments.train_tokenizer -c experiments/configs/tokenizer/digits_vq.yaml --out runs/digits_vq
    # your images (datamodules.shards writes the shards; the rFID extractor: experiments.train_extractor --shards)
    python -m experiments.train_tokenizer -c experiments/configs/tokenizer/small_vq.yaml --out runs/photo_vq \
        --set data.train_shards='shards/train-*.tar' --set data.val_shards='shards/val-*.tar' \
        --set train.extractor_weights=runs/extractors/photos.safetensors
    # the LlamaGen VQ-16 at 256 px (a GPU: train.accelerator=auto; on a CPU only a smoke test of a few steps)
    python -m experiments.train_tokenizer -c experiments/configs/tokenizer/vq16_256.yaml --out runs/vq16 --set ...

Settings: experiments/tokenizer_config.py (typed; an unknown key, a bad value or a key nothing reads in this run,
e.g. data.train_shards with data.kind=digits, is one line naming it and exit 2). Digits: the 8x8 digits are upscaled
to ``image_size`` (PIL bicubic by default, exactly what the generator's image DataModule does to the embedded
shards) and grey is replicated to RGB. Shards: any size, RGB, ADM centre crop (as ``tokenizers.pretokenize``
encodes them) + random flip, streamed; PSNR and rFID are measured on the first ``data.val_count`` val images.
Writes to --out:
  tokenizer.safetensors  weights, with kind/config/fingerprint embedded as metadata
  tokenizer.json         kind, config, fingerprint (what a generator records)
  reconstructions.png    val originals (top) vs reconstructions (bottom)
  metrics.json           val PSNR, val rFID (the extractor named in it), codebook usage, perplexity, ...
  tb/                    TensorBoard logs (losses, usage, image grids)
A generator then uses it with ``tokenizer.kind=llamagen_vq tokenizer.path=OUT/tokenizer.safetensors``, and
``tokenizers.pretokenize --tokenizer-kind llamagen_vq --tokenizer-path OUT/tokenizer.safetensors`` encodes with it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from experiments.tokenizer_config import UPSAMPLE, extractor_kind, load_tokenizer_config


def digits_images(split: str, image_size: int, upsample: str = "pil_bicubic", seed: int = 0):
    """(uint8 [n, 3, S, S], int64 [n]) digits upscaled from 8x8 and replicated to RGB."""
    from datamodules.digits import digits_arrays

    if upsample not in UPSAMPLE:
        raise ValueError(f"data.upsample: expected one of {', '.join(UPSAMPLE)}, got {upsample!r}")
    images, labels = digits_arrays(split, seed)
    if upsample == "pil_bicubic":
        from PIL import Image

        from datamodules.transforms import resize_square, to_rgb

        x = np.stack([np.asarray(resize_square(to_rgb(Image.fromarray(im)), image_size)) for im in images])
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    x = torch.from_numpy(images).float().unsqueeze(1)  # [n, 1, 8, 8]
    kwargs = {} if upsample == "nearest" else {"align_corners": False}
    x = F.interpolate(x, size=(image_size, image_size), mode=upsample, **kwargs)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # [n, 3, S, S]
    return x, torch.from_numpy(labels)


def load_config(path: str | None, args) -> dict:
    flags = {"train.max_steps": args.max_steps, "train.seed": args.seed, "data.batch_size": args.batch_size,
             "tokenizer.preset": args.preset}
    return load_tokenizer_config(path, flags, args.set)


def rfid_extractor(cfg: dict):
    """The extractor rFID is measured with (None for train.extractor=none), checked against the data's domain."""
    from experiments.fid_setup import ensure_digits_extractor
    from lightning_modules.metrics.extractors import DEFAULT_DIGITS_WEIGHTS, load_extractor
    from lightning_modules.metrics.shard_extractor import check_domain

    data, train = cfg["data"], cfg["train"]
    kind = extractor_kind(_Cfg(cfg))
    if kind == "none":
        return None
    if kind == "digits":
        weights = ensure_digits_extractor(train["extractor_weights"] or DEFAULT_DIGITS_WEIGHTS)
        extractor = load_extractor("digits", weights)
    else:
        extractor = load_extractor(kind, train["extractor_weights"])
    if data["kind"] == "shards":
        check_domain(extractor, data["image_size"], data["val_shards"])
    return extractor


class _Cfg:
    """Attribute access over the plain dict, for the helpers written against the DictConfig."""

    def __init__(self, d: dict):
        self._d = d

    def __getattr__(self, name):
        v = self._d[name]
        return _Cfg(v) if isinstance(v, dict) else v


def data_loaders(cfg: dict):
    """(train loader, val loader, val images uint8 [n, 3, S, S], a label for the log line)."""
    from torch.utils.data import DataLoader, TensorDataset

    data, train = cfg["data"], cfg["train"]
    if data["kind"] == "digits":  # the embedded digits, in memory, exactly as before shards were supported
        x_train, y_train = digits_images("train", data["image_size"], data["upsample"], data["seed"])
        x_val, y_val = digits_images("val", data["image_size"], data["upsample"], data["seed"])
        loader_g = torch.Generator().manual_seed(train["seed"])
        train_dl = DataLoader(TensorDataset(x_train, y_train), batch_size=data["batch_size"], shuffle=True,
                              drop_last=True, generator=loader_g)
        return train_dl, DataLoader(TensorDataset(x_val, y_val), batch_size=128), x_val, "val images"
    from datamodules.images import ImageShardDataModule
    from lightning_modules.metrics.shard_extractor import shard_images

    dm = ImageShardDataModule(data["train_shards"], None, batch_size=data["batch_size"],
                              num_workers=data["num_workers"], image_size=data["image_size"], seed=train["seed"],
                              random_flip=data["random_flip"], center_crop=data["center_crop"],
                              persistent_workers=data["num_workers"] > 0)
    x_val, y_val = shard_images(data["val_shards"], data["image_size"], data["val_count"], data["center_crop"])
    return dm.train_dataloader(), DataLoader(TensorDataset(x_val, y_val), batch_size=128), x_val, \
        f"val images of {data['val_shards']}"


@torch.no_grad()
def evaluate(tokenizer, images: torch.Tensor, batch_size: int = 128) -> tuple[dict, torch.Tensor]:
    """Val PSNR (dB, mean per image), codebook usage and perplexity; returns the reconstructions too."""
    from lightning_modules.tokenizer import code_stats, psnr_uint8

    tokenizer.eval()
    recs, codes = [], []
    for i in range(0, len(images), batch_size):
        c = tokenizer.encode(images[i:i + batch_size])
        codes.append(c.flatten())
        recs.append(tokenizer.decode(c).cpu())
    rec = torch.cat(recs)
    usage, ppl = code_stats(torch.cat(codes).cpu(), tokenizer.vocab_size)
    return {"val_psnr": float(psnr_uint8(images, rec).mean()), "val_codebook_usage": usage,
            "val_codes_used": int(round(usage * tokenizer.vocab_size)), "val_perplexity": ppl}, rec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("-c", "--config", default=None, help="YAML with tokenizer/data/train sections")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--preset", default=None, help="LlamaGen VQ preset (tokenizers.vq.PRESETS)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=5e-4")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    cfg = load_config(args.config, args)

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_modules.callbacks.images import save_png, upscale
    from lightning_modules.callbacks.rfid import ReconstructionFID
    from lightning_modules.official.checkpoint_io import save_tokenizer
    from lightning_modules.tokenizer import VQTokenizerModule, reconstruction_grid
    from lightning_modules.tf32 import cuda_tf32

    data, train = cfg["data"], cfg["train"]
    if train["num_threads"] > 0:  # on a shared CPU box 1 thread can beat 2 spin-waiting OpenMP threads
        torch.set_num_threads(train["num_threads"])
    L.seed_everything(train["seed"], workers=True, verbose=False)
    train_dl, val_dl, x_val, val_what = data_loaders(cfg)

    module = VQTokenizerModule(
        preset=cfg["tokenizer"]["preset"], vq=cfg["tokenizer"].get("vq") or {}, lr=train["lr"],
        weight_decay=train["weight_decay"], rec_loss=train["rec_loss"], disc_start=train["disc_start"],
        disc_weight=train["disc_weight"], disc_layers=train["disc_layers"], disc_ndf=train["disc_ndf"],
        perceptual_weight=train["perceptual_weight"], perceptual_path=train["perceptual_path"])
    steps_per_batch = 2 if module.disc is not None else 1  # manual optimisation: global_step counts opt steps
    os.makedirs(args.out, exist_ok=True)
    extractor = rfid_extractor(cfg)
    rfid = ReconstructionFID(extractor, x_val) if extractor is not None else None  # val/rfid at every validation
    if data["kind"] == "digits":
        val = dict(check_val_every_n_epoch=train["val_every_epochs"])
    elif train["val_every_steps"]:  # a shard epoch can be all of ImageNet: validate by steps
        val = dict(check_val_every_n_epoch=None, val_check_interval=train["val_every_steps"] * steps_per_batch)
    else:
        val = dict(limit_val_batches=0)  # measured once, below, after training
    cpu = train["accelerator"] == "cpu"
    trainer = L.Trainer(
        accelerator=train["accelerator"], devices=1, max_steps=train["max_steps"] * steps_per_batch, max_epochs=-1,
        logger=TensorBoardLogger(args.out, name="tb", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
        callbacks=[rfid] if rfid is not None else [],
        # with 2+ CPU threads some kernels otherwise reduce in a varying order: runs differ; CUDA has no
        # deterministic nearest-upsample backward, so there it only warns
        deterministic=True if cpu else "warn", num_sanity_val_steps=0, **val)
    start = time.time()
    with cuda_tf32(train["tf32"]):  # the training steps only: validation's encode/decode run IEEE regardless
        trainer.fit(module, train_dl, val_dl)
    seconds = time.time() - start

    tokenizer = module.vq.eval().cpu()
    weights, _ = save_tokenizer(tokenizer, args.out, kind="llamagen_vq")
    metrics, rec = evaluate(tokenizer, x_val)
    # the originals' statistics are the callback's, computed once
    metrics["val_rfid"] = rfid.score(rec) if rfid is not None else None
    metrics["rfid_images"] = len(x_val)
    metrics["rfid_extractor"] = extractor.name if extractor is not None else "none (train.extractor=none)"
    metrics.update({"steps": train["max_steps"], "train_seconds": round(seconds, 1),
                    "grid": list(tokenizer.grid(data["image_size"], data["image_size"])),
                    "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint,
                    "tokenizer_path": weights, "data": data["kind"], "image_size": data["image_size"]})
    if data["kind"] == "shards":
        metrics["val_shards"] = data["val_shards"]
    # the whole grid, frame included, doubled (nearest): the PNG as it has always been
    save_png(upscale(reconstruction_grid(x_val, rec, 16), 2), os.path.join(args.out, "reconstructions.png"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    rfid_text = f"{metrics['val_rfid']:.2f}" if metrics["val_rfid"] is not None else "n/a"
    print(f"val PSNR {metrics['val_psnr']:.2f} dB, rFID {rfid_text} ({len(x_val)} {val_what}, "
          f"{'digits' if extractor is not None and extractor.name.startswith('digits') else metrics['rfid_extractor']} "
          f"extractor), codebook usage {metrics['val_codes_used']}/"
          f"{tokenizer.vocab_size}, perplexity {metrics['val_perplexity']:.1f}, {seconds:.0f}s -> {args.out}")
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """``roar-train-tokenizer``: main() returns the metrics (for tests and callers); a console script needs an exit
    code. A bad setting or input is one line naming it, exit 2."""
    from experiments.config import ConfigError

    try:
        main(argv)
    except ConfigError as err:
        print(f"error: config {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
