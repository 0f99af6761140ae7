"""Exponential moving average of the backbone weights, as a callback (shadow kept in fp32, saved in checkpoints).

DDP / DeepSpeed ZeRO-2 / one device: the shadow is a whole fp32 copy of every trainable backbone parameter, and
``ema_weights(pl_module)`` swaps it into the backbone for sampling / evaluation and back out.

DeepSpeed ZeRO-3: a rank holds only its partition of each parameter (``param.ds_tensor``, a flat 1/W slice), so
the shadow is sharded the same way and each rank averages its own slice (no communication per step, 1/W of
the memory). ``gathered(pl_module)`` all-gathers the averaged weights one parameter at a time (a collective:
every rank iterates it), which is how the sampling callbacks get them (callbacks/gathered.py).

Checkpoints always hold whole fp32 tensors under the backbone's parameter names, whatever the strategy, so
experiments/export.py and experiments/checkpoints.py::load_generator(ema=True) read them unchanged and a resume
re-slices them for the current world. Under ZeRO-3 that makes ``state_dict()`` a collective too; DeepSpeed
saves collectively anyway (every rank calls trainer.save_checkpoint: ModelCheckpoint, SlurmRequeue,
experiments/signals.py do).
"""
from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch


def is_partitioned(p: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: its ``data`` is a placeholder, this rank's slice lives in ``ds_tensor``."""
    return getattr(p, "ds_tensor", None) is not None


def local_value(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``p``: the whole tensor, or its flat ZeRO-3 slice."""
    return p.ds_tensor if is_partitioned(p) else p


def slice_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a whole tensor shaped like ``p``. DeepSpeed's layout (partition_parameters.py):
    the flattened tensor, zero-padded to W equal parts, part r on rank r."""
    import torch.distributed as dist

    size = p.ds_tensor.numel()
    start = dist.get_rank(group=p.ds_process_group) * size
    flat = full.reshape(-1)
    part = torch.zeros(size, dtype=full.dtype)
    n = max(0, min(size, flat.numel() - start))
    part[:n] = flat[start:start + n]
    return part


def gather_slices(part: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Collective: every rank's slice of ``p``'s shadow -> the whole tensor (on every rank), shaped like ``p``."""
    import torch.distributed as dist

    parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group=p.ds_process_group))]
    dist.all_gather(parts, part.contiguous(), group=p.ds_process_group)
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


class EMA(L.Callback):
    def __init__(self, decay: float = 0.9999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}  # whole tensors, or this rank's ZeRO-3 slices once placed
        self.updates = 0
        self._params: dict[str, torch.Tensor] = {}  # the live parameters the shadow is laid out for ({} = not yet)

    @staticmethod
    def _trainable(pl_module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in pl_module.backbone.named_parameters() if p.requires_grad}

    def _place(self, pl_module) -> dict[str, torch.Tensor]:
        """Lay the shadow out like the live parameters: a fresh copy on a fresh run, else the saved whole tensors
        moved next to the weights (and sliced under ZeRO-3). At on_train_start or first use: under DeepSpeed
        Lightning restores weights and callback state only after on_fit_start (a copy taken there would be of the
        initial weights, and the restored shadow would stay on the CPU)."""
        if self._params:
            return self._params
        params = self._trainable(pl_module)
        if not self.shadow:  # fresh run: start as an exact copy (DiT's update_ema(decay=0))
            self.shadow = {n: local_value(p).detach().float().clone() for n, p in params.items()}
        else:
            missing = sorted(set(params) - set(self.shadow))
            if missing:
                raise ValueError(f"callbacks.ema_decay: the checkpoint's EMA has no {missing[0]!r}")
            self.shadow = {n: (slice_of(self.shadow[n], p) if is_partitioned(p) else self.shadow[n]).float()
                           .to(local_value(p).device) for n, p in params.items()}
        self._params = params
        return params

    def on_train_start(self, trainer, pl_module):
        self._place(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # accumulation (no optimizer step yet) or a skipped non-finite step (training_step returned None):
        # the weights did not change, so neither does the average
        if trainer.global_step <= self.updates or outputs is None:
            self.updates = max(self.updates, trainer.global_step)
            return
        self.updates = trainer.global_step
        params = self._place(pl_module)  # ZeRO-3: this rank's slices, updated in place by the step
        # one multi-tensor call (fused kernels on GPU) instead of a lerp_ per tensor; the same arithmetic (bit for bit
        # on CPU: tests/test_scale_callbacks.py)
        live = [local_value(p).detach().float() for p in params.values()]
        torch._foreach_lerp_([self.shadow[n] for n in params], live, 1.0 - self.decay)

    def gathered(self, pl_module):
        """Yields (name, whole fp32 tensor) per averaged parameter, in the same order on every rank. Under ZeRO-3
        each item is an all-gather, so every rank must run the iteration to the end."""
        for n, p in self._place(pl_module).items():
            yield n, (gather_slices(self.shadow[n], p) if is_partitioned(p) else self.shadow[n])

    def state_dict(self):
        if self._params:
            shadow = {n: (gather_slices(self.shadow[n], p) if is_partitioned(p) else self.shadow[n]).cpu()
                      for n, p in self._params.items()}
        else:  # loaded and not placed yet: already whole tensors on the CPU
            shadow = {n: t.cpu() for n, t in self.shadow.items()}
        return {"decay": self.decay, "updates": self.updates, "shadow": shadow}

    def load_state_dict(self, state):
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], dict(state["shadow"])
        self._params = {}  # whole tensors: re-laid out at the next use

    @contextmanager
    def ema_weights(self, pl_module):
        """Temporarily load the averaged weights into ``pl_module.backbone`` (whole parameters only: under ZeRO-3
        sample through callbacks/gathered.py::sampling_module, which takes them from ``gathered``)."""
        params = self._place(pl_module)
        if any(is_partitioned(p) for p in params.values()):
            raise RuntimeError("EMA.ema_weights: parameters are ZeRO-3 partitions; use "
                               "lightning_modules.callbacks.gathered.sampling_module")
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


def find_ema(trainer):
    """The attached callback offering ``ema_weights`` (duck-typed, so tests can pass a stand-in), or None."""
    return next((c for c in (trainer.callbacks if trainer else []) if callable(getattr(c, "ema_weights", None))), None)


@contextmanager
def averaged_weights(trainer, pl_module):
    """EMA weights when an EMA callback is attached, the live weights otherwise (whole parameters only)."""
    ema = find_ema(trainer)
    if ema is None:
        yield
    else:
        with ema.ema_weights(pl_module):
            yield
