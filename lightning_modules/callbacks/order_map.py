"""Generation-order pictures for any ordering, from the sampler's recorder (per-step ``positions`` [B, n_t]).

  - order map: [h, w] of the step at which each position was decoded (known positions = -1), colour-mapped, with
    the step numbers written in when the grid is small (<= 16x16);
  - reveal animation: the image after every step, decoded through the tokenizer, undecoded patches grey (GIF).
``OrderMap`` logs both to TensorBoard every N steps (``order/map``; ``order/reveal`` = the frames as one strip
image, since TensorBoard videos need moviepy) and writes ``<run>/order/step_XXXXXX_{map.png,reveal.gif}``.
Nothing here knows a method: raster maps come out as 0..N-1 in raster order, RandAR/ARPG as their parallel groups.
"""
from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from PIL import Image

from lightning_modules.callbacks.gathered import sampling_module
from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display

GREY = 128
MAX_NUMBERED = 256  # write step numbers into cells up to a 16x16 grid
MAX_STRIP_FRAMES = 12  # frames in the TensorBoard strip (the GIF keeps every step)


class OrderRecorder:
    """A ``generate(recorder=...)`` callable keeping each step's positions and tokens (long [B, n_t], on CPU) and,
    when the generation had known tokens, which of those positions were kept rather than generated (bool [B, n_t]:
    fixed-order orderings visit known positions in their turn; any-order ones never do, so theirs are all False)."""

    def __init__(self):
        self.positions: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.kept: list[torch.Tensor | None] = []

    def __call__(self, record: dict) -> None:
        self.positions.append(record["positions"].detach().cpu())
        self.tokens.append(record["tokens"].detach().cpu())
        kept = record.get("kept")
        self.kept.append(None if kept is None else kept.detach().cpu())


def step_map(positions: list[torch.Tensor], grid: tuple[int, int],
             kept: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Per-step positions (long [B, n_t] each) -> long [B, h, w]: the step that decoded each position, -1 if none
    or if ``kept`` (an OrderRecorder's, bool [B, n_t] per step) says the step kept a known token there."""
    B = positions[0].shape[0]
    out = torch.full((B, grid[0] * grid[1]), -1, dtype=torch.long)
    for t, pos in enumerate(positions):
        step = torch.full(pos.shape, t, dtype=torch.long)
        if kept is not None and kept[t] is not None:
            step.masked_fill_(kept[t], -1)
        out.scatter_(1, pos.long(), step)
    return out.view(B, *grid)


def render_order_map(maps: torch.Tensor, numbers: bool | None = None, cell: float = 0.35) -> torch.Tensor:
    """long [B, h, w] step maps -> one uint8 [3, H, W] picture (viridis; known/-1 cells light grey)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    B, h, w = maps.shape
    numbers = h * w <= MAX_NUMBERED if numbers is None else numbers
    side = max(1.6, cell * max(h, w))
    fig = Figure(figsize=(side * B + 0.8, side + 0.3), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top = max(0, int(maps.max()))
    axes = fig.subplots(1, B, squeeze=False)[0]
    for b, ax in enumerate(axes):
        grid = np.ma.masked_less(maps[b].numpy(), 0)
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=max(1, top), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if numbers:
            size = max(4.0, min(9.0, 60.0 / max(h, w)))
            for (r, c), v in np.ndenumerate(maps[b].numpy()):
                ax.text(c, r, "k" if v < 0 else str(v), ha="center", va="center", fontsize=size,
                        color="black" if v < 0 or v > 0.6 * top else "white")
    fig.colorbar(im, ax=list(axes), fraction=0.04, pad=0.02, label="decode step")
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def reveal_frames(tokenizer, recorder: OrderRecorder, grid: tuple[int, int],
                  known: tuple[torch.Tensor, torch.Tensor] | None = None, device="cpu") -> list[torch.Tensor]:
    """Frames uint8 [B, 3, H, W] on the CPU: the known tokens, then the image after each step; undecoded patches
    grey. ``device``: where the tokenizer runs."""
    B = recorder.positions[0].shape[0]
    N = grid[0] * grid[1]
    tokens = torch.zeros(B, N, dtype=torch.long)
    shown = torch.zeros(B, N, dtype=torch.bool)
    if known is not None:
        mask, known_tokens = known[0].cpu().bool(), known[1].cpu().long()
        tokens[:, mask], shown[:, mask] = known_tokens[:, mask], True
    frames = [_frame(tokenizer, tokens, shown, grid, device)]
    for pos, tok in zip(recorder.positions, recorder.tokens):
        tokens.scatter_(1, pos, tok)
        shown.scatter_(1, pos, True)
        frames.append(_frame(tokenizer, tokens, shown, grid, device))
    return frames


def _frame(tokenizer, tokens, shown, grid, device) -> torch.Tensor:
    images = tokenizer.decode(tokens.view(-1, *grid).to(device)).cpu()  # [B, 3, H, W]
    ph, pw = images.shape[2] // grid[0], images.shape[3] // grid[1]
    pixel = shown.view(-1, 1, *grid).repeat_interleave(ph, 2).repeat_interleave(pw, 3)  # patch -> pixels
    return torch.where(pixel, images, torch.full_like(images, GREY))


def save_gif(frames: list[torch.Tensor], path: str, duration_ms: int = 120) -> str:
    """Frames uint8 [3, H, W] -> looping GIF (the last frame held 1 s); written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pictures = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [1000]
    tmp = f"{path}.tmp.gif"
    pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    os.replace(tmp, path)
    return path


def frame_grids(frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each frame's samples side by side, upscaled for display: uint8 [3, H', W'] per frame."""
    scale = upscale_for_display(frames[0])
    return [image_grid(f, nrow=f.shape[0], scale=scale) for f in frames]


def strip(grids: list[torch.Tensor], max_frames: int = MAX_STRIP_FRAMES) -> torch.Tensor:
    """Evenly chosen frames (first and last included) stacked top to bottom: uint8 [3, k*H', W']."""
    idx = np.unique(np.linspace(0, len(grids) - 1, min(max_frames, len(grids))).round().astype(int))
    return torch.cat([grids[i] for i in idx], 1)


@torch.no_grad()
def record_generation(module, labels: torch.Tensor, seed: int, known=None, **overrides):
    """Sample with a recorder -> (codes long [B, h, w], OrderRecorder, settings)."""
    from lightning_modules.base import make_generator
    from lightning_modules.sampling import generate

    rec = OrderRecorder()
    settings = module.sample_settings(**overrides)
    gen = make_generator(seed, module.device)
    codes = generate(module, labels.to(module.device), settings, gen, known=known, recorder=rec)
    return codes.view(-1, *module.grid), rec, settings


def write_order_pictures(module, labels: torch.Tensor, seed: int, out_prefix: str, **overrides) -> dict:
    """Sample ``labels``, write ``<prefix>map.png`` and ``<prefix>reveal.gif``; return the pictures and paths."""
    was_training = module.training
    module.eval()
    try:
        _, rec, _ = record_generation(module, labels, seed, **overrides)
    finally:
        module.train(was_training)
    grid = tuple(module.grid)
    maps = step_map(rec.positions, grid)
    picture = render_order_map(maps)
    grids = frame_grids(reveal_frames(module.tokenizer, rec, grid, device=module.device))
    return {"maps": maps, "map": picture, "strip": strip(grids),
            "map_png": save_png(picture, f"{out_prefix}map.png"), "gif": save_gif(grids, f"{out_prefix}reveal.gif")}


class OrderMap(L.Callback):
    """Every ``every_n_steps`` (and at fit end): order map + reveal animation for ``labels`` with a fixed seed."""

    def __init__(self, every_n_steps: int, labels: list[int], seed: int, out_dir: str,
                 sample_kwargs: dict | None = None):
        self.every, self.labels, self.seed, self.out_dir = every_n_steps, list(labels), seed, out_dir
        self.sample_kwargs = dict(sample_kwargs or {})
        self._last_step = -1
        self.last: dict = {}

    def log_pictures(self, trainer, pl_module) -> None:
        step = trainer.global_step
        self._last_step = step
        # every rank enters (a collective under ZeRO-3: callbacks/gathered.py); rank 0 alone samples and writes
        with sampling_module(trainer, pl_module, ranks="zero") as (module, _):
            if module is None:
                return
            self.last = write_order_pictures(module, torch.tensor(self.labels), self.seed,
                                             os.path.join(self.out_dir, f"step_{step:06d}_"), **self.sample_kwargs)
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("order/map", self.last["map"], global_step=step)
            logger.experiment.add_image("order/reveal", self.last["strip"], global_step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and step != self._last_step:
            self.log_pictures(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.every and trainer.global_step != self._last_step:
            self.log_pictures(trainer, pl_module)
