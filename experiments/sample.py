"""Sample from a trained or imported generator: a class-balanced set as per-batch shards, merged into the ADM .npz
(arr_0 uint8 NHWC, + labels), a PNG grid and a JSON record of the protocol.

    python -m experiments.sample --ckpt runs/<name>/checkpoints/last.ckpt --out samples/
    python -m experiments.sample --ckpt imports/randar_L --out samples/ --per-class 50        # the ADM 50k set
    torchrun --nproc-per-node 8 -m experiments.sample --ckpt ... --out ... --per-class 50  # split over 8 GPUs
    python -m experiments.sample --ckpt ... --out ... sample.num_steps=32 sample.cfg_scale=4 sample.mode=consistent

The sample set is the project's one protocol (lightning_modules/sample_set.py): sample i has class i % C, batches
of --batch-size (100) are drawn with seeds derived from --seed (0, as the FID callback's callbacks.sample_seed),
so the set does not depend on the number of ranks, and the .npz of a checkpoint scores exactly the val/fid it
logged in training. Every rank writes its own shards (<name>.shards/batch-XXXXXX.npz: images and codes); a killed
run, started again with the same command, redoes only the missing shards; rank 0 streams them into <name>.npz, so
no process ever holds the whole set. EMA weights are used when the checkpoint has them (else the live weights;
--no-ema forces live); the log says which. Every sampling knob is in the file name, then the head of the inputs'
fingerprint (weights, tokenizer, classes, every setting, seed, batch, device type: all that makes the images), e.g.
``randar_steps22-randar_cosine_cfg4-linear-p1_t1_k0_p1_official_seed0_n40_3f9a02c1.npz``: another checkpoint,
--no-ema, --classes or sample.cfg_start writes a new set beside the old one, never reuses the old one's shards
(<name>.shards/inputs.json records the inputs; sample_shards checks them before reusing a shard).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import time

import torch

from experiments.cli import fail


def knob_name(module, settings, seed: int, n: int) -> str:
    s = settings
    m = module.model_cfg
    variant = m.variant + (f"-{m.scan}" if "scan" in module.ordering.reads and m.scan != "raster" else "")
    return (f"{variant}_steps{s.num_steps}-{s.schedule}_cfg{s.cfg_scale:g}-{s.cfg_schedule}-p{s.cfg_power:g}"
            f"_t{s.temperature:g}_k{s.top_k}_p{s.top_p:g}_{s.mode}{non_default(s)}_seed{seed}_n{n}")


def non_default(s) -> str:
    """The draw, precision and TF32, only where they differ from the defaults (older file names stay valid)."""
    return ((f"_{s.draw}" if s.draw != "multinomial" else "") + (f"_{s.precision}" if s.precision != "fp32" else "")
            + ("" if s.tf32 else "_notf32"))


def parse_overrides(items: list[str]) -> dict:
    from omegaconf import OmegaConf

    from experiments.config import SampleConfig
    from experiments.validate import validate_sample_ranges

    from lightning_modules.hparams import typed

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key.startswith("sample.") or key[7:] not in SampleConfig.__dataclass_fields__ or not value:
            fail(f"{key}: unknown sampling override (use sample.<{'|'.join(SampleConfig.__dataclass_fields__)}>=value)")
        out[key[7:]] = OmegaConf.from_dotlist([f"x={value}"]).x
    try:  # types, fixed choices (sample.draw, .precision, ...) and ranges, as the training config checks them
        checked = typed(SampleConfig, out, "sample")
        validate_sample_ranges({key: getattr(checked, key) for key in out})
    except ValueError as err:  # ConfigError is one
        fail(str(err))
    return out


def check_counts(a) -> None:
    """The set's size flags, refused before a checkpoint is read (sample_set would raise deep in the run)."""
    for flag, value, low in (("--per-class", a.per_class, 1), ("--num-samples", a.num_samples, 0),
                             ("--batch-size", a.batch_size, 1)):
        if value < low:
            fail(f"{flag}: {value} must be >= {low}" + (" (0 = --per-class x classes)" if low == 0 else ""))
    parse_classes(a.classes)


def parse_classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        fail(f"--classes: {text!r} must be comma-separated class ids, e.g. 0,3,7")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sample_inputs(module, weights: str, settings, classes: list[int], n: int, batch_size: int, seed: int,
                  device: str) -> dict:
    """Everything that determines the set's images (what its fingerprint covers). The device type, not the index:
    CPU and CUDA draw different streams, but rank r's cuda:r draws what rank 0's would (resumable on other ranks)."""
    return {"weights_sha256": weights, "weights_used": module.weights_used, "tokenizer": module.tokenizer_fingerprint,
            "model": dict(module.hparams["model"]), "settings": vars(settings), "classes": list(classes),
            "num_samples": n, "batch_size": batch_size, "seed": seed, "device": torch.device(device).type}


def sample_shards(module, batches, folder: str, show: bool, inputs: dict | None = None, **overrides) -> int:
    """Sample every batch whose shard is missing; returns how many were sampled (this rank). ``inputs``: checked
    against (or recorded in) the folder before any shard there is reused (sample_shards.claim_folder)."""
    from experiments.sample_shards import claim_folder, done_batches, write_shard
    from lightning_modules.progress import Progress

    if inputs is not None:
        claim_folder(folder, inputs)
    done = done_batches(folder)
    todo = [b for b in batches if b.index not in done]
    with Progress(sum(len(b.labels) for b in todo), "sample", "images", enabled=show) as bar:
        for b in todo:
            codes = module.sample_codes(b.labels, b.seed, **overrides)  # long [n, h, w]
            images = module.tokenizer.decode(codes).cpu()  # uint8 [n, 3, H, W]
            write_shard(folder, b.index, images=images.permute(0, 2, 3, 1).numpy(), codes=codes.cpu().numpy(),
                        labels=b.labels.numpy(), samples=b.samples.numpy())
            bar.update(len(b.labels))
    return len(todo)


def finish(a, module, settings, name: str, folder: str, classes: list[int], n: int, world: int, t0: float,
           inputs: dict) -> None:
    """Rank 0: check every shard is there, stream them into the .npz, draw the grid, write the JSON record."""
    from experiments.sample_shards import done_batches, fingerprint, merge_shards, read_shard
    from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display
    from lightning_modules.sample_set import num_batches

    everything = list(range(num_batches(n, a.batch_size)))
    missing = sorted(set(everything) - done_batches(folder))
    if missing:
        fail(f"{folder}: {len(missing)} of {len(everything)} shards missing (e.g. batch {missing[0]}): a rank failed; "
             f"run the same command again to sample only those", 1)
    npz = os.path.join(a.out, f"{name}.npz")
    count = merge_shards(folder, everything, npz)
    first = torch.from_numpy(read_shard(folder, 0)["images"]).permute(0, 3, 1, 2)
    shown = first[: len(classes) * max(1, min(a.per_class, 8))]
    png = save_png(image_grid(shown, nrow=min(len(classes), len(shown)), scale=upscale_for_display(first)),
                   os.path.join(a.out, f"{name}.png"))
    record = {"npz": npz, "png": png, "num_samples": count, "classes": classes, "batch_size": a.batch_size,
              "seed": a.seed, "ranks": world, "weights": module.weights_used, "checkpoint": os.path.abspath(a.ckpt),
              "settings": vars(settings), "seconds": round(time.time() - t0, 1),
              "fingerprint": fingerprint(inputs), "inputs": inputs}
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"sample: {count} images ({module.weights_used} weights) -> {npz} and {png}", flush=True)


def main(argv=None) -> int:
    from lightning_modules.sample_set import BATCH

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="our .ckpt, a run folder, an export / import folder, or a .safetensors")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (50 -> the ADM 50k protocol)")
    p.add_argument("--num-samples", type=int, default=0, help="total samples instead of --per-class x classes")
    p.add_argument("--classes", default="", help="comma-separated class ids (default: all)")
    p.add_argument("--batch-size", type=int, default=BATCH, help="the protocol's batch (one seed per batch)")
    p.add_argument("--seed", type=int, default=0, help="the protocol's seed (the FID callback's callbacks.sample_seed)")
    p.add_argument("--no-ema", action="store_true",
                   help="use the live weights even when EMA weights exist (default: EMA when the checkpoint has it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout-s", type=float, default=1800, help="how long ranks wait for each other at the end")
    p.add_argument("overrides", nargs="*", metavar="sample.key=value")
    a = p.parse_args(argv)
    overrides = parse_overrides(a.overrides)
    check_counts(a)
    from experiments.checkpoints import CheckpointError, load_generator
    from experiments.sample_shards import ForeignShards, fingerprint, shard_dir, weights_digest
    from lightning_modules.sample_set import sample_batches
    from tokenizers.base import TokenizerMismatchError

    t0 = time.time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if a.device == "cuda" and world > 1 else a.device
    try:
        module = load_generator(a.ckpt, ema=False if a.no_ema else "auto")
        weights = weights_digest(module)  # on the CPU copy, before it moves to the GPU
        module = module.to(device).eval()
    except (FileNotFoundError, CheckpointError, TokenizerMismatchError, ValueError) as err:
        fail(str(err).splitlines()[0], 2)
    try:
        settings = module.checked_sample_settings(**overrides)
    except ValueError as err:
        fail(str(err))
    classes = parse_classes(a.classes) or list(range(module.backbone.num_classes))
    bad = [c for c in classes if not 0 <= c < module.backbone.num_classes]
    if bad:
        fail(f"--classes: {bad} outside [0, {module.backbone.num_classes})")
    n = a.num_samples or a.per_class * len(classes)
    inputs = sample_inputs(module, weights, settings, classes, n, a.batch_size, a.seed, device)
    name = (knob_name(module, settings, a.seed, n) + (f"_b{a.batch_size}" if a.batch_size != BATCH else "")
            + f"_{fingerprint(inputs)[:8]}")  # other inputs, other name: an earlier set is kept, never reused
    folder = shard_dir(a.out, name)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(seconds=a.timeout_s))
    if rank == 0:
        print(f"sample: {n} images in batches of {a.batch_size} over {world} rank(s), {module.weights_used} weights, "
              f"{settings.num_steps} steps -> {folder}/", flush=True)
    batches = sample_batches(n, classes, a.batch_size, a.seed, rank, world)
    try:
        sampled = sample_shards(module, batches, folder, show=rank == 0, inputs=inputs, **overrides)
    except ForeignShards as err:  # the folder's shards come from other inputs (claim_folder)
        fail(str(err), alone=world > 1)
    print(f"sample: rank {rank}: {sampled} batches sampled, {len(batches) - sampled} already on disk, peak memory "
          f"{peak_rss_mb():.0f} MB", flush=True)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        finish(a, module, settings, name, folder, classes, n, world, t0, inputs)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
