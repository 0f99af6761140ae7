"""`make demo`: the four orderings on the embedded digits with an equal budget, as one comparison table.

Each arm is experiments/configs/demo/raster.yaml with only ``model.variant`` changed: same backbone size, steps,
global batch, seed and tokens seen. The ``--vq-variants`` arms (none by default; ``make demo-vq`` adds raster, RandAR
and ARPG) train the same way on the codes of the project's own digits VQ (configs/demo/vq_codes.yaml; the VQ is
trained first when --vq-dir has none), so the table also compares tokenizers. For every arm: validation NLL
(bits/token of its own vocabulary), FID of 200 class-balanced samples at the preset's sampling settings (digits
extractor), their class-consistency (the share the digits CNN assigns to their conditioning class: 0.1 = the
class is ignored), the sampler's default number of steps, images/s of sampling, and a sample grid. Runs go to
runs/demo/<name>/; a finished arm is resumed at its last step (nothing retrained) when the demo runs again.

    python -m experiments.demo [--steps 400] [--out runs/demo] [--variants raster,rar,randar,arpg]
                               [--vq-variants raster,randar,arpg] [--vq-dir runs/digits_vq]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from experiments.config import load_config
from experiments.signals import ends_in_one_line

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEMO_PRESET = os.path.join(CONFIGS, "demo", "raster.yaml")
VQ_OVERLAY = os.path.join(CONFIGS, "demo", "vq_codes.yaml")  # the demo preset on the digits VQ's codes
VQ_CONFIG = os.path.join(CONFIGS, "tokenizer", "digits_vq.yaml")
DEMO_SWEEP = os.path.join(CONFIGS, "sweeps", "demo.yaml")  # its axes.variants are the demo's arms
FID_SAMPLES = 200  # per arm, class-balanced, the FID callback's protocol (eval_plan)


def arm_config(variant: str, steps: int, out: str, extra: list[str] = (), vq_weights: str = "", sweep=None):
    """The demo preset with ``model.variant`` and the demo sweep's ``arm_overrides`` of that ordering (so the
    sweep collects these runs: same config hash); on the digits VQ's codes when ``vq_weights`` is given.
    ``sweep``: the loaded demo sweep, so a caller building many arms reads it once (default: load it here)."""
    from experiments.ablate import arm_overrides, load_sweep

    extra = [*arm_overrides(sweep if sweep is not None else load_sweep(DEMO_SWEEP), variant), *extra]
    steps_override = [f"trainer.max_steps={steps}"] if steps else []  # 0 = the preset's (the sweep uses it too)
    presets, vq = ([DEMO_PRESET, VQ_OVERLAY], [f"tokenizer.path={vq_weights}"]) if vq_weights else ([DEMO_PRESET], [])
    name = f"{variant}_vq" if vq_weights else variant
    return load_config(presets, [f"model.variant={variant}", *steps_override, f"name={name}", f"out_dir={out}",
                                 *vq, *extra])


def demo_arms() -> list[str]:
    """The orderings the demo trains: the demo sweep's ``axes.variants`` (config, not a list in code)."""
    from omegaconf import OmegaConf

    return list(OmegaConf.load(DEMO_SWEEP).axes.variants)


def ensure_digits_vq(vq_dir: str) -> str:
    """runs/digits_vq/tokenizer.safetensors, trained by the project command when it is not there yet."""
    weights = os.path.join(vq_dir, "tokenizer.safetensors")
    if os.path.isfile(weights):
        print(f"demo: using the digits VQ in {vq_dir} (delete it to retrain)", flush=True)
        return weights
    from experiments import train_tokenizer

    print(f"demo: training the digits VQ tokenizer -> {vq_dir} (python -m experiments.train_tokenizer -c "
          f"{os.path.relpath(VQ_CONFIG)} --out {vq_dir})", flush=True)
    m = train_tokenizer.main(["-c", VQ_CONFIG, "--out", vq_dir])
    print(f"demo: digits VQ: val PSNR {m['val_psnr']:.2f} dB, rFID {m['val_rfid']:.2f}, "
          f"{m['val_codes_used']}/{m['vocab_size']} codes used, {m['train_seconds']:.0f} s", flush=True)
    return weights


def sample_and_score(module, scorer, n: int = FID_SAMPLES, batch: int = 100) -> dict:
    """n class-balanced samples at the module's own sampling settings: images/s, FID, class-consistency (the
    share the digits CNN assigns to their conditioning class), the images."""
    from lightning_modules.sample_set import timed_sample_set

    images, labels_all, images_per_s = timed_sample_set(module, n, batch, seed=0)
    return {"images_per_s": images_per_s, "fid": scorer.fid(images),
            "class_consistency": scorer.class_consistency(images, labels_all), "images": images}


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for title, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(row.get(key, "")) for _, key in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])


@ends_in_one_line  # Ctrl-C / SIGTERM while an arm trains: one line, 130 / 143 (experiments/signals.py)
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="training steps per arm (0 = the preset's)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--variants", default="", help="comma-separated arms (default: the demo sweep's axes.variants)")
    p.add_argument("--vq-variants", default="", help="arms on the digits VQ's codes, e.g. raster (`make demo-vq`; "
                                                     "it first trains the VQ: ~2 min)")
    p.add_argument("--vq-dir", default="runs/digits_vq", help="the digits VQ (trained here when missing)")
    from lightning_modules.metrics.extractors import DEFAULT_DIGITS_WEIGHTS

    p.add_argument("--extractor", default=DEFAULT_DIGITS_WEIGHTS, help="digits FID extractor")
    a = p.parse_args(argv)
    a.variants = a.variants or ",".join(demo_arms())
    # all cores by default; ROAR_DEMO_THREADS=1 when another job shares the machine (OpenMP threads that wait
    # on a busy core make small models many times slower)
    torch.set_num_threads(int(os.environ.get("ROAR_DEMO_THREADS", 0)) or max(1, os.cpu_count() or 1))
    from omegaconf import OmegaConf

    from experiments.ablate import FidScorer, SweepEval, load_sweep
    from experiments.checkpoints import load_generator
    from experiments.train import run
    from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display

    rows, t0 = [], time.time()
    scorer = FidScorer(OmegaConf.merge(OmegaConf.structured(SweepEval), {"extractor_weights": a.extractor}))
    vq_variants = [v for v in a.vq_variants.split(",") if v]
    vq_weights = ensure_digits_vq(a.vq_dir) if vq_variants else ""
    arms = [(v, "") for v in a.variants.split(",")] + [(v, vq_weights) for v in vq_variants]
    sweep = load_sweep(DEMO_SWEEP)
    for variant, weights in arms:
        cfg = arm_config(variant, a.steps, a.out, vq_weights=weights, sweep=sweep)
        print(f"demo: training {cfg.name} ({cfg.trainer.max_steps} steps, global batch "
              f"{cfg.trainer.global_batch_size}, tokenizer {cfg.tokenizer.kind})", flush=True)
        result = run(cfg, quiet=True)
        module = load_generator(os.path.join(result["run_dir"], "checkpoints", "last.ckpt")).eval()
        scores = sample_and_score(module, scorer)
        images = scores["images"]
        # eval_plan labels are index % num_classes: the first 40 are 4 rows of classes 0..9
        grid = save_png(image_grid(images[:40], nrow=10, scale=upscale_for_display(images)),
                        os.path.join(a.out, f"{cfg.name}_samples.png"))
        rows.append({"variant": variant, "tokenizer": f"{cfg.tokenizer.kind} ({module.backbone.vocab_size})",
                     "val_nll": f"{result['val_nll_bits']:.4f}", f"fid{FID_SAMPLES}": f"{scores['fid']:.1f}",
                     "class_consistency": f"{scores['class_consistency']:.3f}",
                     "steps": module.sample_settings().num_steps, "images_per_s": f"{scores['images_per_s']:.1f}",
                     "params_M": f"{result['params'] / 1e6:.2f}", "train_s": result["fit_seconds"], "grid": grid,
                     "run": cfg.name})
    cols = [("variant", "variant"), ("tokenizer (vocab)", "tokenizer"), ("val NLL (bits/token)", "val_nll"),
            (f"FID{FID_SAMPLES}", f"fid{FID_SAMPLES}"), ("class-consistency", "class_consistency"),
            ("sampling steps", "steps"), ("images/s", "images_per_s"),
            ("params (M)", "params_M"), ("train s", "train_s")]
    table = markdown_table(rows, cols)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n" + table + "\n")
    for row in rows:
        print(f"demo: {row['run']}: samples {row['grid']}, run {a.out}/{row['run']}/ (TensorBoard: tb/)")
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
    out = run_sweep(DEMO_SWEEP, overrides=[f"out_dir={a.out}", f"axes.variants=[{a.variants}]",
                                                f"eval.extractor_weights={a.extractor}"],
                    extra=[f"trainer.max_steps={a.steps}"] if a.steps else [], log=lambda msg: print(msg, flush=True))
    print(f"demo: ablation table {out['markdown']} (CSV {out['csv']}), plots {out['plots_dir']}/, "
          f"TensorBoard {out['tb_dir']}")
    from lightning_modules.variants import capabilities

    variant = next((v for v in variants if capabilities(v).any_order), variants[0])
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
