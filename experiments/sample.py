"""Sample from a trained or imported generator: a PNG grid and an ADM-format .npz (arr_0 uint8 NHWC).

    python -m experiments.sample --ckpt runs/<name>/checkpoints/last.ckpt --out samples/
    python -m experiments.sample --ckpt imports/randar_L --out samples/ --per-class 50        # class-balanced 50k
    torchrun --nproc-per-node 8 -m experiments.sample --ckpt ... --out ... --per-class 50  # split over GPUs
    python -m experiments.sample --ckpt ... --out ... sample.num_steps=32 sample.cfg_scale=4 sample.mode=consistent

Every sampling knob is in the file name, e.g.
``randar_steps22-randar_cosine_cfg4.0-linear-p1.0_t1.0_k0_p1.0_official_seed0_n40.npz``.
Labels are class-balanced in class order (sample i has class i % C); batch b is sampled with seed
derive(seed, b), so a sample set does not depend on the number of ranks.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from experiments.cli import fail


def knob_name(module, settings, seed: int, n: int) -> str:
    s = settings
    m = module.model_cfg
    variant = m.variant + (f"-{m.scan}" if "scan" in module.ordering.reads and m.scan != "raster" else "")
    return (f"{variant}_steps{s.num_steps}-{s.schedule}_cfg{s.cfg_scale:g}-{s.cfg_schedule}-p{s.cfg_power:g}"
            f"_t{s.temperature:g}_k{s.top_k}_p{s.top_p:g}_{s.mode}{non_default(s)}_seed{seed}_n{n}")


def non_default(s) -> str:
    """The draw and precision, only where they differ from the defaults (older file names stay valid)."""
    return (f"_{s.draw}" if s.draw != "multinomial" else "") + (f"_{s.precision}" if s.precision != "fp32" else "")


def parse_overrides(items: list[str]) -> dict:
    from omegaconf import OmegaConf

    from experiments.config import SampleConfig

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key.startswith("sample.") or key[7:] not in SampleConfig.__dataclass_fields__ or not value:
            fail(f"{key}: unknown sampling override (use sample.<{'|'.join(SampleConfig.__dataclass_fields__)}>=value)")
        out[key[7:]] = OmegaConf.from_dotlist([f"x={value}"]).x
    return out


def class_balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(num_classes * per_class) % num_classes


def sample_all(module, labels: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1,
               **overrides) -> dict[int, torch.Tensor]:
    """Batches b = rank, rank + world, ... ; returns {batch index: uint8 [b, 3, H, W]}."""
    from lightning_modules.base import derive_seed

    out = {}
    for b in range(rank, (len(labels) + batch_size - 1) // batch_size, world):
        chunk = labels[b * batch_size: (b + 1) * batch_size]
        out[b] = module.sample_images(chunk, derive_seed(seed, b), **overrides).cpu()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="our .ckpt, an export / import folder, or model.safetensors")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (50 -> the ADM 50k protocol)")
    p.add_argument("--classes", default="", help="comma-separated class ids (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true",
                   help="use the live weights even when EMA weights exist (default: EMA when the checkpoint has it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", metavar="sample.key=value")
    a = p.parse_args(argv)
    overrides = parse_overrides(a.overrides)
    from experiments.checkpoints import load_generator

    try:
        module = load_generator(a.ckpt, ema=False if a.no_ema else "auto").to(a.device).eval()
    except (FileNotFoundError, ValueError) as err:
        fail(str(err).splitlines()[0], 1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    classes = [int(c) for c in a.classes.split(",") if c] or list(range(module.backbone.num_classes))
    labels = torch.tensor(classes)[class_balanced_labels(len(classes), a.per_class)]
    try:
        settings = module.checked_sample_settings(**overrides)
    except ValueError as err:
        fail(str(err))
    name = knob_name(module, settings, a.seed, len(labels))
    os.makedirs(a.out, exist_ok=True)
    parts = sample_all(module, labels, a.batch_size, a.seed, rank, world, **overrides)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, parts)
        parts = {k: v for d in gathered for k, v in d.items()}
    if rank == 0:
        from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display

        images = torch.cat([parts[b] for b in sorted(parts)])  # [n, 3, H, W], class-balanced order
        npz = os.path.join(a.out, f"{name}.npz")
        np.savez(npz, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        shown = images[: len(classes) * min(a.per_class, 8)]
        png = save_png(image_grid(shown, nrow=len(classes), scale=upscale_for_display(images)),
                       os.path.join(a.out, f"{name}.png"))
        print(f"sample: {len(images)} images ({module.weights_used} weights) -> {npz} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
