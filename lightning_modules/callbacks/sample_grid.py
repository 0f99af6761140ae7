"""Every N steps (and at the end of fit): sample fixed classes with fixed seeds, log a grid to TensorBoard
(``samples/grid``) and write ``<run>/samples/step_XXXXXX.png``. Same labels and seeds for every variant.

Every rank runs the hooks (under ZeRO-3 fetching the weights is a collective, callbacks/gathered.py); rank 0
alone samples, writes the PNG and logs the image."""
from __future__ import annotations

import os

import lightning as L
import torch

from lightning_modules.callbacks.gathered import sampling_module
from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display


class SampleGrid(L.Callback):
    def __init__(self, every_n_steps: int, classes: list[int], per_class: int, seed: int, out_dir: str,
                 sample_kwargs: dict | None = None):
        self.every = every_n_steps
        self.classes, self.per_class, self.seed = list(classes), per_class, seed
        self.out_dir = out_dir
        self.sample_kwargs = dict(sample_kwargs or {})
        self.last_path = ""

    def labels(self) -> torch.Tensor:
        # [per_class * C]: row r of the grid = sample r of every class, so one column per class
        return torch.tensor(self.classes * self.per_class, dtype=torch.long)

    def render(self, trainer, pl_module) -> torch.Tensor | None:
        """The grid on rank 0, None elsewhere; every rank must call it (see the module docstring)."""
        with sampling_module(trainer, pl_module, ranks="zero") as (module, _):
            if module is None:
                return None
            images = module.sample_images(self.labels(), self.seed, **self.sample_kwargs)
        return image_grid(images.cpu(), nrow=len(self.classes), scale=upscale_for_display(images))

    def log_grid(self, trainer, pl_module) -> None:
        self._last_step = step = trainer.global_step
        grid = self.render(trainer, pl_module)
        if grid is None:
            return
        self.last_path = save_png(grid, os.path.join(self.out_dir, f"step_{step:06d}.png"))
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("samples/grid", grid, global_step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and step != getattr(self, "_last_step", -1):
            self.log_grid(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if getattr(self, "_last_step", -1) != trainer.global_step:
            self.log_grid(trainer, pl_module)
