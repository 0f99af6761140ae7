"""Zero-shot editing with any ordering: inpainting, outpainting, class-conditional editing (pure functions).

All three are one operation, "keep some tokens, generate the rest", through ``generate(..., known=...)``:
    inpaint:   known = outside the region; the region is regenerated under the image's class
    outpaint:  known = inside the region (default ``center``); everything around it is generated
    edit:      inpaint under a *new* class label (keep the outside, regenerate the inside)
RandAR and ARPG put the known positions first and teacher-force them in one prefill (training on random orders
makes any subset a valid prefix, randar_arpg.md §1.3/§2.4), then decode the unknown positions in any order, in
parallel. The CFG ramp counts the known tokens as decoded (the loop's choice; the papers leave it open).

Limitation of raster and RAR: they can only decode in raster order. Known tokens are kept exactly when their turn
comes, but an unknown position sees only the known tokens *before* it in raster order: whatever lies below or to
the right of a hole is invisible when the hole is filled (seams at its bottom/right edge), and outpainting the top
rows ignores the centre entirely. ``sees_all_known(module)`` says which case a module is in.

Regions (``region_mask``), half-open token-grid boxes on an h x w grid:
    center: rows/cols [h//4, h - h//4)    left / right: cols [0, w//2) / [w//2, w)
    top / bottom: rows [0, h//2) / [h//2, h)    box:r0,c0,r1,c1: rows [r0, r1), cols [c0, c1)
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from lightning_modules.sampling import Recorder, SampleSettings, generate

REGIONS = ("center", "left", "right", "top", "bottom", "box:r0,c0,r1,c1")


def region_mask(spec: str, grid: tuple[int, int]) -> torch.Tensor:
    """A named region -> bool [h, w] (True inside)."""
    h, w = grid
    boxes = {"center": (h // 4, w // 4, h - h // 4, w - w // 4), "left": (0, 0, h, w // 2),
             "right": (0, w // 2, h, w), "top": (0, 0, h // 2, w), "bottom": (h // 2, 0, h, w)}
    if spec in boxes:
        r0, c0, r1, c1 = boxes[spec]
    elif spec.startswith("box:"):
        try:
            r0, c0, r1, c1 = (int(v) for v in spec[4:].split(","))
        except ValueError:
            raise ValueError(f"--region: {spec!r} must look like box:r0,c0,r1,c1 (four integers)") from None
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise ValueError(f"--region: {spec!r} is empty or outside the {h}x{w} token grid")
    else:
        raise ValueError(f"--region: unknown region {spec!r} (choose from {list(REGIONS)})")
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [H, W] (bool, or uint8 with > 127 = inside) -> bool [h, w]: a token is inside when at least
    half of its pixel patch is."""
    m = mask.float() if mask.dtype == torch.bool else (mask.float() > 127).float()
    pooled = F.adaptive_avg_pool2d(m[None, None], grid)[0, 0]  # [h, w] fraction of each patch inside
    return pooled >= 0.5


def as_region(region, grid: tuple[int, int]) -> torch.Tensor:
    """A region name, or a bool mask already on the token grid -> bool [h, w]."""
    if isinstance(region, str):
        return region_mask(region, grid)
    if tuple(region.shape) != tuple(grid):
        raise ValueError(f"region mask shape {tuple(region.shape)} does not match the token grid {tuple(grid)}")
    return region.bool()


def fit_steps(module, settings: SampleSettings, known: tuple[torch.Tensor, torch.Tensor]) -> SampleSettings:
    """Keep the requested step count when the ordering accepts it, else cap it at the number of unknown positions.

    RandAR/ARPG decode only the unknown positions, so more steps than unknowns is impossible; raster/RAR decode
    every position (one per step) and need exactly N. Tried on the ordering's own plan, so nothing here knows a
    method."""
    unknown = int((~known[0]).sum())
    error = None
    for steps in dict.fromkeys((settings.num_steps, max(1, min(settings.num_steps, unknown)))):
        try:
            probe = torch.Generator(device=module.device).manual_seed(0)
            module.ordering.decode_plan(1, steps, settings.schedule, probe, (known[0], known[1][:1]),
                                        device=module.device)
            return replace(settings, num_steps=steps)
        except ValueError as err:
            error = err
    raise ValueError(f"sample.num_steps: {settings.num_steps} steps do not fit {unknown} unknown positions ({error})")


def complete(module, codes: torch.Tensor, known_mask: torch.Tensor, labels: torch.Tensor,
             settings: SampleSettings | None = None, generator: torch.Generator | None = None,
             recorder: Recorder | None = None) -> torch.Tensor:
    """Keep ``codes`` [B, h, w] where ``known_mask`` bool [h, w] is True, generate the rest -> codes [B, h, w]."""
    grid = tuple(module.grid)
    if tuple(codes.shape[1:]) != grid or tuple(known_mask.shape) != grid:
        raise ValueError(f"editing: codes {tuple(codes.shape)} / mask {tuple(known_mask.shape)} do not match the "
                         f"model grid {grid}")
    if bool(known_mask.all()):
        return codes.clone()  # nothing to generate
    device = module.device
    known = (known_mask.flatten().to(device), codes.reshape(codes.shape[0], -1).long().to(device))
    settings = fit_steps(module, settings or module.sample_settings(), known)
    out = generate(module, labels.to(device), settings, generator, known=known, recorder=recorder)
    return out.view(-1, *grid)


def inpaint(module, codes, region, labels, settings=None, generator=None, recorder=None) -> torch.Tensor:
    """Regenerate ``region`` (a name or bool [h, w]) under ``labels``; keep the outside exactly."""
    return complete(module, codes, ~as_region(region, module.grid), labels, settings, generator, recorder)


def outpaint(module, codes, region, labels, settings=None, generator=None, recorder=None) -> torch.Tensor:
    """Keep ``region`` (default use: ``center``) exactly; generate everything around it."""
    return complete(module, codes, as_region(region, module.grid), labels, settings, generator, recorder)


def class_edit(module, codes, region, new_labels, settings=None, generator=None, recorder=None) -> torch.Tensor:
    """Keep the tokens outside ``region``; regenerate the inside under ``new_labels``."""
    return inpaint(module, codes, region, new_labels, settings, generator, recorder)


TASKS = {"inpaint": inpaint, "outpaint": outpaint, "edit": class_edit}


def known_mask_for(task: str, region: torch.Tensor) -> torch.Tensor:
    """The kept positions bool [h, w] of ``task`` for a region mask (outpaint keeps the region, the others not)."""
    return region if task == "outpaint" else ~region


def sees_all_known(module) -> bool:
    """True when the ordering puts known tokens first (every generated token sees all of them: any-order
    orderings); False when it keeps its own order and known tokens after a position are unseen (fixed scans)."""
    return module.ordering.capabilities.any_order
