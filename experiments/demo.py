"""`make demo`: the four orderings on the embedded digits with an equal budget, as one comparison table.

Each arm is experiments/configs/demo/raster.yaml with only ``model.variant`` changed: same backbone size, steps,
global batch, seed and tokens seen. For every arm: validation NLL (bits/token), the sampler's default number of
steps, images/s of sampling, and a class-balanced sample grid. Runs go to runs/demo/<variant>/; a finished arm
is resumed at its last step (nothing retrained) when the demo runs again.

    python -m experiments.demo [--steps 400] [--out runs/demo] [--variants raster,rar,randar,arpg]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from experiments.config import load_config

DEMO_PRESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo", "raster.yaml")
VARIANTS = ("raster", "rar", "randar", "arpg")
DEMO_SWEEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sweeps", "demo.yaml")


def arm_config(variant: str, steps: int, out: str, extra: list[str] = ()):
    steps_override = [f"trainer.max_steps={steps}"] if steps else []  # 0 = the preset's (the sweep uses it too)
    return load_config([DEMO_PRESET], [f"model.variant={variant}", *steps_override, f"name={variant}",
                                       f"out_dir={out}", *extra])


def images_per_second(module, num_classes: int, per_class: int = 10, seed: int = 0) -> tuple[float, torch.Tensor]:
    labels = torch.arange(num_classes * per_class) % num_classes
    start = time.perf_counter()
    images = module.sample_images(labels, seed)
    return len(labels) / (time.perf_counter() - start), images


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for title, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(row.get(key, "")) for _, key in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="training steps per arm (0 = the preset's)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args(argv)
    # all cores by default; ROAR_DEMO_THREADS=1 when another job shares the machine (OpenMP threads that wait
    # on a busy core make small models many times slower)
    torch.set_num_threads(int(os.environ.get("ROAR_DEMO_THREADS", 0)) or max(1, os.cpu_count() or 1))
    from experiments.checkpoints import load_generator
    from experiments.train import run
    from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display

    rows, t0 = [], time.time()
    for variant in a.variants.split(","):
        cfg = arm_config(variant, a.steps, a.out)
        print(f"demo: training {variant} ({cfg.trainer.max_steps} steps, global batch {cfg.trainer.global_batch_size})",
              flush=True)
        result = run(cfg, quiet=True)
        module = load_generator(os.path.join(result["run_dir"], "checkpoints", "last.ckpt")).eval()
        ips, images = images_per_second(module, cfg.model.num_classes)
        grid = save_png(image_grid(images[:40], nrow=10, scale=upscale_for_display(images)),
                        os.path.join(a.out, f"{variant}_samples.png"))
        rows.append({"variant": variant, "val_nll": f"{result['val_nll_bits']:.4f}",
                     "steps": module.sample_settings().num_steps, "images_per_s": f"{ips:.1f}",
                     "params_M": f"{result['params'] / 1e6:.2f}", "train_s": result["fit_seconds"], "grid": grid})
    cols = [("variant", "variant"), ("val NLL (bits/token)", "val_nll"), ("sampling steps", "steps"),
            ("images/s", "images_per_s"), ("params (M)", "params_M"), ("train s", "train_s")]
    table = markdown_table(rows, cols)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n" + table + "\n")
    for row in rows:
        print(f"demo: {row['variant']}: samples {row['grid']}, run {a.out}/{row['variant']}/ (TensorBoard: tb/)")
    zero_shot_and_ablation(a)
    print(f"demo: done in {time.time() - t0:.0f} s; table in {a.out}/table.md; "
          f"view the curves with: .venv/bin/tensorboard --logdir {a.out}")
    return 0


def zero_shot_and_ablation(a) -> None:
    """The ablation sweep over the arms just trained (collected, not retrained: same config hashes), then an
    inpainting example and a decode-order map from an any-order arm (RandAR when it is in --variants)."""
    from experiments.ablate import run_sweep
    from experiments.checkpoints import load_generator
    from experiments.edit import dataset_image, run_edit
    from lightning_modules.callbacks.order_map import write_order_pictures
    from lightning_modules.editing import region_mask

    variants = a.variants.split(",")
    out = run_sweep(DEMO_SWEEP, overrides=[f"out_dir={a.out}", f"axes.variants=[{a.variants}]"],
                    extra=[f"trainer.max_steps={a.steps}"] if a.steps else [], log=lambda msg: print(msg, flush=True))
    print(f"demo: ablation table {out['markdown']} (CSV {out['csv']}), plots {out['plots_dir']}/, "
          f"TensorBoard {out['tb_dir']}")
    variant = next((v for v in ("randar", "arpg") if v in variants), variants[0])
    module = load_generator(os.path.join(a.out, variant, "checkpoints", "last.ckpt")).eval()
    image, label = dataset_image(0)
    edit = run_edit(module, "inpaint", image, label, region_mask("center", module.grid),
                    os.path.join(a.out, "inpaint", variant))
    print(f"demo: inpainting ({variant}, val digit 0, centre regenerated): {edit['side_by_side']} "
          f"(input | kept tokens | result)")
    pictures = write_order_pictures(module, torch.arange(4), 0, os.path.join(a.out, "order", f"{variant}_"))
    print(f"demo: decode order ({variant}): map {pictures['map_png']}, animation {pictures['gif']}")


if __name__ == "__main__":
    raise SystemExit(main())
