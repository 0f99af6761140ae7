"""Training progress in a log file (SLURM, CI, a pipe): status lines instead of a bar.

Lightning's Rich bar draws only on a terminal: in a log file it shows nothing until the run ends, then one
frame reading ``Epoch 0/-2`` (max_epochs - 1 of a step-bounded run). A multi-node job's log is a file, so off a
terminal the trainer gets this bar instead, under lightning_modules/progress.py's policy (``ROAR_PROGRESS``,
``ROAR_PROGRESS_EVERY_S``, default 30 s) and in its format, on rank 0 only:

    train: 1200/10000 steps (12.0%), 3.4 steps/s, elapsed 0:05:52, eta 0:43:08, train/loss 2.366

plus a line after each validation (``val: step 1200, val/nll 3.402``) and a last one when training ends.
"""
from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ProgressBar

from lightning_modules.progress import Progress


def _metrics(items: dict, prefix: str) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in sorted(items.items()) if k.startswith(prefix))


class LineProgressBar(ProgressBar):
    """A ``ProgressBar`` (so Lightning uses it in place of its own) that prints progress.py lines; build_trainer
    installs it where ``progress_mode()`` is "lines"."""

    def __init__(self, every_s: float | None = None):
        super().__init__()
        self.every_s = every_s
        self.enabled = True
        self.progress: Progress | None = None

    def disable(self) -> None:  # Lightning calls this on every rank but 0 (ProgressBar.setup)
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    @property
    def is_enabled(self) -> bool:
        return self.enabled

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.progress = Progress(total, "train", "steps", enabled=self.enabled, every_s=self.every_s,
                                 initial=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress is not None and trainer.global_step > self.progress.done:  # optimizer steps, not batches
            self.progress.postfix = _metrics(self.get_metrics(trainer, pl_module), "train/")
            self.progress.update(trainer.global_step - self.progress.done)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.enabled and not trainer.sanity_checking:
            shown = _metrics(self.get_metrics(trainer, pl_module), "val/")
            print(f"val: step {trainer.global_step}" + (f", {shown}" if shown else ""), file=sys.stderr, flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
