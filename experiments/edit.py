"""Zero-shot editing with a trained generator: inpainting, outpainting, class editing, resolution extrapolation.

    python -m experiments.edit --ckpt runs/demo/randar --task inpaint --from-dataset 0 --region center --out edits/
    python -m experiments.edit --ckpt CKPT --task outpaint --image digit.png --region center --class 3 --out edits/
    python -m experiments.edit --ckpt CKPT --task edit --from-dataset 5 --mask mask.png --class 7 --out edits/
    python -m experiments.edit --ckpt CKPT --task extrapolate --class 4 --out edits/ sample.cfg_scale=3

Regions: center, left, right, top, bottom, box:r0,c0,r1,c1 (token grid, half-open). inpaint / edit regenerate the
region (edit under --class, a new class); outpaint keeps the region and generates around it. --mask is a PNG of
the image's size, white = the region. Images are resized to the model's pixel size; without --class the image's
class is the dataset label (--from-dataset) or the null class (unconditional). RandAR / ARPG see every kept token;
raster / RAR decode in raster order, so kept tokens below or right of a hole are not seen when it is filled.
Writes OUT/{input,mask,result,side_by_side,order_map}.png: mask.png is white where tokens were generated; side by
side = input | kept tokens, the rest grey | result; order_map = the decode step of every generated position (kept
ones read "k", also where raster / RAR pass them in their turn). A region that leaves nothing to generate is refused.
Extrapolation: input = the native-resolution first pass, kept = its (2i, 2j) positions on the 2x grid; it generates
from a class (--class, else the label of --from-dataset's sample; its pixels are not used), never from --image.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from experiments.cli import fail


def load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """PNG/JPEG -> uint8 [1, 3, H, W] at the model's pixel size (bicubic resize, grey -> 3 channels)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image: not found: {path}")
    from datamodules.transforms import to_rgb

    img = to_rgb(Image.open(path)).resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous()


def load_mask(path: str, grid: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    from lightning_modules.editing import mask_to_grid

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--mask: not found: {path}")
    return mask_to_grid(torch.from_numpy(np.array(Image.open(path).convert("L"))), grid)


def dataset_image(index: int, split: str = "val") -> tuple[torch.Tensor, int]:
    """The embedded digits: (uint8 [1, 3, 8, 8], label) of ``index`` in ``split``."""
    from datamodules.digits import digits_arrays

    images, labels = digits_arrays(split)
    if not 0 <= index < len(images):
        raise ValueError(f"--from-dataset: index {index} outside the {split} split (0..{len(images) - 1})")
    return torch.from_numpy(images[index])[None, None].expand(1, 3, -1, -1).contiguous(), int(labels[index])


def pixels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Token mask bool [h, w] -> bool [H, W] (each token's patch)."""
    return mask.repeat_interleave(size[0] // mask.shape[0], 0).repeat_interleave(size[1] // mask.shape[1], 1)


def run_edit(module, task: str, image: torch.Tensor, label: int, region: torch.Tensor, out_dir: str, seed: int = 0,
             high_steps: int = 0, ntk_boundary: int = 2, **overrides) -> dict:
    """Run ``task`` and write the pictures; image uint8 [1, 3, H, W], region bool [h, w] -> paths and codes."""
    from lightning_modules.base import make_generator
    from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display
    from lightning_modules.callbacks.order_map import OrderRecorder, render_order_map, step_map
    from lightning_modules.editing import TASKS, known_mask_for
    from lightning_modules.extrapolation import SCALE, extrapolate

    tok, grid = module.tokenizer, tuple(module.grid)
    settings = module.sample_settings(**overrides)
    gen = make_generator(seed, module.device)
    labels = torch.tensor([label], device=module.device)
    rec = OrderRecorder()
    if task == "extrapolate":  # a generation task: the "input" is the native-resolution first pass
        out = extrapolate(module, labels, settings, gen, high_steps=high_steps, ntk_boundary=ntk_boundary,
                          recorder=rec)
        result = tok.decode(out["codes"]).cpu()
        low = tok.decode(out["low"]).cpu()
        shown_input = low.repeat_interleave(SCALE, 2).repeat_interleave(SCALE, 3)  # same size as the result
        kept = torch.zeros(SCALE * grid[0], SCALE * grid[1], dtype=torch.bool)
        kept[::SCALE, ::SCALE] = True  # the first-phase positions (2i, 2j)
        input_png, big = low, (SCALE * grid[0], SCALE * grid[1])
    else:
        codes = tok.encode(image.to(module.device))  # [1, h, w]
        if tuple(codes.shape[1:]) != grid:
            raise ValueError(f"--image: encodes to a {tuple(codes.shape[1:])} grid, the model expects {grid}")
        kept = known_mask_for(task, region)
        if bool(kept.all()):  # generate() would run no step: no result to show, no order to map
            raise ValueError(f"editing: {task} keeps every token of the region given; nothing is left to generate")
        result = tok.decode(TASKS[task](module, codes, region, labels, settings, gen, rec)).cpu()
        shown_input = input_png = tok.decode(codes).cpu()
        big = grid
    size = tuple(result.shape[2:])
    keep_px = pixels(kept, size)
    masked = torch.where(keep_px, shown_input, torch.full_like(shown_input, 128))
    region_px = (~keep_px).to(torch.uint8)[None].expand(3, -1, -1) * 255  # white = generated
    scale = upscale_for_display(result)
    steps = step_map(rec.positions, big, rec.kept)  # [1, h, w]; kept cells -1 ("k"), also where raster visits them
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "input": save_png(input_png[0], os.path.join(out_dir, "input.png")),
        "mask": save_png(region_px.contiguous(), os.path.join(out_dir, "mask.png")),
        "result": save_png(result[0], os.path.join(out_dir, "result.png")),
        "side_by_side": save_png(image_grid(torch.cat([shown_input, masked, result]), nrow=3, scale=scale),
                                 os.path.join(out_dir, "side_by_side.png")),
        "order_map": save_png(render_order_map(steps), os.path.join(out_dir, "order_map.png")),
    }
    return dict(paths, positions=rec.positions, kept=kept, steps=steps)


def main(argv=None) -> int:
    from experiments.sample import parse_overrides
    from lightning_modules.editing import REGIONS, known_mask_for, region_mask, sees_all_known

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run folder, .ckpt, export or import folder")
    p.add_argument("--task", required=True, choices=("inpaint", "outpaint", "edit", "extrapolate"))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="input image (resized to the model's pixel size)")
    src.add_argument("--from-dataset", type=int, metavar="INDEX", help="an embedded digits image (val split)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--mask", help="PNG, white = the region")
    where.add_argument("--region", default="center", help=f"named region: {', '.join(REGIONS)}")
    p.add_argument("--class", dest="klass", type=int, default=None, help="class label (edit: the new class)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a Lightning checkpoint")
    p.add_argument("--high-steps", type=int, default=0, help="extrapolate: decode steps of the 2x pass (0 = default)")
    p.add_argument("--ntk-boundary", type=int, default=2, help="extrapolate: frequencies that extrapolate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", metavar="sample.key=value")
    a = p.parse_args(argv)
    overrides = parse_overrides(a.overrides)
    from experiments.checkpoints import load_generator

    try:
        module = load_generator(a.ckpt, device=a.device, ema=a.ema)
        grid, tok = tuple(module.grid), module.tokenizer
        size = (grid[0] * tok.downsample, grid[1] * tok.downsample)
        image, label = torch.zeros(1, 3, *size, dtype=torch.uint8), module.backbone.num_classes  # null class
        if a.task == "extrapolate":  # generates both passes itself: of a dataset sample only the label can be used
            if a.image is not None:
                fail("--image: extrapolate generates a new image and cannot start from one; give --class (or "
                     "--from-dataset, whose label becomes the class)")
            if a.from_dataset is not None and a.klass is None:
                label = dataset_image(a.from_dataset)[1]
                print(f"edit: extrapolate: class {label} (the label of --from-dataset {a.from_dataset}; the image "
                      f"itself is not used)")
        else:
            if a.image is None and a.from_dataset is None:
                fail(f"--task {a.task}: give --image or --from-dataset")
            image, label = (load_image(a.image, size), label) if a.image else dataset_image(a.from_dataset)
            if not sees_all_known(module):
                print(f"edit: note: {type(module).__name__} decodes in raster order; kept tokens after a generated "
                      f"position are not seen when it is decoded")
        if a.task == "edit" and a.klass is None:
            fail("--task edit: give the new class with --class")
        if a.klass is not None:
            if not 0 <= a.klass < module.backbone.num_classes:
                fail(f"--class: {a.klass} outside [0, {module.backbone.num_classes})")
            label = a.klass
        region = load_mask(a.mask, grid) if a.mask else region_mask(a.region, grid)
        if a.task != "extrapolate" and bool(known_mask_for(a.task, region).all()):
            what = "covers the whole" if a.task == "outpaint" else "is empty on the"
            fail(f"{'--mask ' + a.mask if a.mask else '--region ' + a.region}: the region {what} {grid[0]}x{grid[1]} "
                 f"token grid, so {a.task} keeps every token and nothing is left to generate")
        out = run_edit(module, a.task, image, label, region, a.out, a.seed, a.high_steps, a.ntk_boundary,
                       **overrides)
    except (FileNotFoundError, ValueError) as err:  # bad input (checkpoint, image, mask): one line, exit 2
        fail(str(err).splitlines()[0], 2)
    print(f"edit: {a.task} -> {out['side_by_side']} (input, mask, result, order_map in {os.path.normpath(a.out)}/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
