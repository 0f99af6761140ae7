"""Train a small LlamaGen-layout VQ tokenizer on the embedded digits (CPU, ~2 minutes).

    python -m experiments.train_tokenizer --out runs/digits_vq [--max-steps N] [--seed S]
    python -m experiments.train_tokenizer -c experiments/configs/tokenizer/digits_vq.yaml --out runs/digits_vq

The 8x8 digits are upscaled to ``image_size`` and grey is replicated to RGB. The default upscaling is PIL bicubic
(``pil_bicubic``): exactly what the generator's image DataModule does to the embedded shards at that
``data.image_size``, so the codes a generator trains on come from the images the VQ learned (and the tokenizer
has smooth strokes to learn rather than 4x4 flat blocks). Writes to --out:
  tokenizer.safetensors  weights, with kind/config/fingerprint embedded as metadata
  tokenizer.json         kind, config, fingerprint (what a generator records)
  reconstructions.png    val originals (top) vs reconstructions (bottom)
  metrics.json           val PSNR, val rFID (digits extractor, 359 val images), codebook usage, perplexity, ...
  tb/                    TensorBoard logs (losses, usage, image grids)
A generator then uses it with ``tokenizer: {kind: llamagen_vq, path: runs/digits_vq/tokenizer.safetensors}``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from lightning_modules.metrics.extractors import DEFAULT_DIGITS_WEIGHTS

DEFAULTS = {
    "tokenizer": {"preset": "digits", "vq": {}},
    "data": {"image_size": 32, "upsample": "pil_bicubic", "batch_size": 64, "seed": 0},
    "train": {"max_steps": 400, "seed": 0, "lr": 1e-3, "weight_decay": 0.0, "rec_loss": "l2", "disc_start": -1,
              "disc_weight": 0.1, "disc_layers": 2, "disc_ndf": 32, "perceptual_weight": 0.0,
              "perceptual_path": "", "val_every_epochs": 5, "num_threads": 0,
              "extractor_weights": DEFAULT_DIGITS_WEIGHTS},  # rFID; trained (seconds) when missing
}


UPSAMPLE = ("pil_bicubic", "bilinear", "nearest", "bicubic")  # pil_bicubic = the image DataModule's resize


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
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config file not found")
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    for key, value in (("train.max_steps", args.max_steps), ("train.seed", args.seed),
                       ("data.batch_size", args.batch_size), ("tokenizer.preset", args.preset)):
        if value is not None:
            OmegaConf.update(cfg, key, value)
    for item in args.set or []:
        key, _, value = item.partition("=")
        if not key or not _:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=5e-4")
        typed = OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"]  # OmegaConf YAML: 5e-4 -> float
        OmegaConf.update(cfg, key, typed, merge=True)
    return OmegaConf.to_container(cfg, resolve=True)


@torch.no_grad()
def evaluate(tokenizer, images: torch.Tensor, batch_size: int = 128) -> tuple[dict, torch.Tensor]:
    """Val PSNR (dB, mean per image), codebook usage and perplexity; returns the reconstructions too."""
    from lightning_modules.tokenizer import code_stats, psnr_uint8

    tokenizer.eval()
    recs, codes = [], []
    for i in range(0, len(images), batch_size):
        c = tokenizer.encode(images[i:i + batch_size])
        codes.append(c.flatten())
        recs.append(tokenizer.decode(c))
    rec = torch.cat(recs)
    usage, ppl = code_stats(torch.cat(codes), tokenizer.vocab_size)
    return {"val_psnr": float(psnr_uint8(images, rec).mean()), "val_codebook_usage": usage,
            "val_codes_used": int(round(usage * tokenizer.vocab_size)), "val_perplexity": ppl}, rec


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("-c", "--config", default=None, help="YAML with tokenizer/data/train sections")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--preset", default=None, help="LlamaGen VQ preset (tokenizers.vq.PRESETS)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=5e-4")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args)

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from experiments.fid_setup import ensure_digits_extractor
    from lightning_modules.callbacks.rfid import ReconstructionFID
    from lightning_modules.metrics.extractors import load_extractor
    from lightning_modules.official.checkpoint_io import save_tokenizer
    from lightning_modules.callbacks.images import save_png, upscale
    from lightning_modules.tokenizer import VQTokenizerModule, reconstruction_grid

    data, train = cfg["data"], cfg["train"]
    if train["num_threads"] > 0:  # on a shared CPU box 1 thread can beat 2 spin-waiting OpenMP threads
        torch.set_num_threads(train["num_threads"])
    L.seed_everything(train["seed"], workers=True, verbose=False)
    x_train, y_train = digits_images("train", data["image_size"], data["upsample"], data["seed"])
    x_val, y_val = digits_images("val", data["image_size"], data["upsample"], data["seed"])
    loader_g = torch.Generator().manual_seed(train["seed"])
    train_dl = DataLoader(TensorDataset(x_train, y_train), batch_size=data["batch_size"], shuffle=True,
                          drop_last=True, generator=loader_g)
    val_dl = DataLoader(TensorDataset(x_val, y_val), batch_size=128)

    module = VQTokenizerModule(
        preset=cfg["tokenizer"]["preset"], vq=cfg["tokenizer"].get("vq") or {}, lr=train["lr"],
        weight_decay=train["weight_decay"], rec_loss=train["rec_loss"], disc_start=train["disc_start"],
        disc_weight=train["disc_weight"], disc_layers=train["disc_layers"], disc_ndf=train["disc_ndf"],
        perceptual_weight=train["perceptual_weight"], perceptual_path=train["perceptual_path"])
    steps_per_batch = 2 if module.disc is not None else 1  # manual optimisation: global_step counts opt steps
    os.makedirs(args.out, exist_ok=True)
    extractor = load_extractor("digits", ensure_digits_extractor(train["extractor_weights"]))
    rfid = ReconstructionFID(extractor, x_val)  # val/rfid in TensorBoard at every validation
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=train["max_steps"] * steps_per_batch, max_epochs=-1,
        logger=TensorBoardLogger(args.out, name="tb", version=""), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10, callbacks=[rfid],
        deterministic=True,  # with 2+ CPU threads some kernels otherwise reduce in a varying order: runs differ
        check_val_every_n_epoch=train["val_every_epochs"], num_sanity_val_steps=0)
    start = time.time()
    trainer.fit(module, train_dl, val_dl)
    seconds = time.time() - start

    tokenizer = module.vq.eval()
    weights, _ = save_tokenizer(tokenizer, args.out, kind="llamagen_vq")
    metrics, rec = evaluate(tokenizer, x_val)
    metrics["val_rfid"] = rfid.score(rec)  # the originals' statistics are the callback's, computed once
    metrics["rfid_images"] = len(x_val)
    metrics.update({"steps": train["max_steps"], "train_seconds": round(seconds, 1),
                    "grid": list(tokenizer.grid(data["image_size"], data["image_size"])),
                    "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint,
                    "tokenizer_path": weights})
    # the whole grid, frame included, doubled (nearest): the PNG as it has always been
    save_png(upscale(reconstruction_grid(x_val, rec, 16), 2), os.path.join(args.out, "reconstructions.png"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"val PSNR {metrics['val_psnr']:.2f} dB, rFID {metrics['val_rfid']:.2f} ({len(x_val)} val images, digits "
          f"extractor), codebook usage {metrics['val_codes_used']}/"
          f"{tokenizer.vocab_size}, perplexity {metrics['val_perplexity']:.1f}, {seconds:.0f}s -> {args.out}")
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """``roar-train-tokenizer``: main() returns the metrics (for tests and callers); a console script needs an exit code."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
