"""Exponential moving average of the backbone weights, as a callback (shadow kept in fp32, saved in checkpoints).

``ema_weights(pl_module)`` swaps the averaged weights in for sampling / evaluation / export and back out.
Not used under DeepSpeed ZeRO-3, where parameters are sharded (the trainer builder leaves it off there).
"""
from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch


class EMA(L.Callback):
    def __init__(self, decay: float = 0.9999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0

    def _params(self, pl_module):
        return {n: p for n, p in pl_module.backbone.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module):
        params = self._params(pl_module)
        if not self.shadow:  # fresh run: start as an exact copy (DiT's update_ema(decay=0))
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        else:  # resumed: the shadow came from the checkpoint, move it next to the weights
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # accumulation (no optimizer step yet) or a skipped non-finite step (training_step returned None):
        # the weights did not change, so neither does the average
        if trainer.global_step <= self.updates or outputs is None:
            self.updates = max(self.updates, trainer.global_step)
            return
        self.updates = trainer.global_step
        for n, p in self._params(pl_module).items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state):
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], dict(state["shadow"])

    @contextmanager
    def ema_weights(self, pl_module):
        """Temporarily load the averaged weights into ``pl_module.backbone``."""
        if not self.shadow:
            yield
            return
        params = self._params(pl_module)
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])


@contextmanager
def averaged_weights(trainer, pl_module):
    """EMA weights when an EMA callback is attached, the live weights otherwise."""
    ema = next((c for c in (trainer.callbacks if trainer else []) if hasattr(c, "ema_weights")), None)
    if ema is None:
        yield
    else:
        with ema.ema_weights(pl_module):
            yield
