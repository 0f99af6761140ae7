"""The module a sampling callback (sample grid, order map, FID) samples with, under every strategy.

DDP / DeepSpeed ZeRO-2 / one device: every rank holds whole weights, so the LightningModule itself samples, with
the EMA weights swapped in place when an EMA callback is attached (callbacks/ema.py).

DeepSpeed ZeRO-3: a rank holds 1/W of every parameter and each submodule's forward all-gathers its weights, so a
forward is a collective. Sampling on rank 0 alone therefore hung at the first sample grid (issue #16), and
sampling in lock-step on every rank would all-gather the whole model once per decode step (hundreds of times per
image). Instead the weights are gathered ONCE per event into a plain replica of the module -- every rank takes
part, one submodule at a time through DeepSpeed's ``zero.GatheredParameters`` (the EMA's slices through
``EMA.gathered``) -- and the replica samples without any collective: on rank 0 only (grid, order map) or on
every rank (FID shares), so ranks may do unequal work without hanging. A plain replica is also what lets
``sample.precision=bf16`` make its bf16 copy (``sampling.sampling_backbone`` deep-copies the backbone, which a
partitioned module cannot be). Cost: one whole copy of the backbone per sampling rank, kept on the CPU between
events (built once, refilled each time).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext

import torch

from lightning_modules.callbacks.ema import find_ema, is_partitioned
from lightning_modules.sampling import between_training_steps

_REPLICAS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # training module -> its plain replica


def is_zero3(pl_module) -> bool:
    return any(is_partitioned(p) for p in pl_module.parameters())


def replica_of(pl_module):
    """A plain (non-DeepSpeed) module of the same class and hyperparameters: how Lightning's load_from_checkpoint
    rebuilds a module. Weights are filled by ``fill_replica``; cached per training module."""
    replica = _REPLICAS.get(pl_module)
    if replica is None:
        replica = type(pl_module)(**pl_module.hparams).eval().requires_grad_(False)
        _REPLICAS[pl_module] = replica
    return replica


@torch.no_grad()
def fill_replica(pl_module, replica, ema=None) -> None:
    """Collective under ZeRO-3 (every rank calls it, ``replica`` None on ranks that do not sample): copy the whole
    live weights -- or the EMA's, for the parameters it averages -- and the buffers into ``replica``."""
    from deepspeed import zero
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    dst = dict(replica.backbone.named_parameters()) if replica is not None else {}
    averaged = set()
    if ema is not None and hasattr(ema, "gathered"):
        for name, full in ema.gathered(pl_module):  # one all-gather per parameter, same order on every rank
            averaged.add(name)
            if dst:
                dst[name].copy_(full)
    for prefix, module in pl_module.backbone.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)]
        own = [(n, p) for n, p in own if n not in averaged]
        # persistent (small) parameters stay gathered between forwards; gathering them again would free them
        # on exit, so only the partitioned ones go through GatheredParameters
        need = [p for _, p in own if p.ds_status != ZeroParamStatus.AVAILABLE]
        with zero.GatheredParameters(need, modifier_rank=None):
            for n, p in own:
                if dst:
                    dst[n].copy_(p.data)
    if replica is not None:  # ZeRO-3 partitions parameters only; buffers are whole on every rank
        mine = dict(replica.backbone.named_buffers())
        for n, b in pl_module.backbone.named_buffers():
            mine[n].copy_(b)


@contextmanager
def sampling_module(trainer, pl_module, ranks: str = "all"):
    """Yields ``(module, used_ema)``: what this rank samples with, or ``None`` on a rank that does not sample
    (``ranks="zero"``: global rank 0 only; ``"all"``: every rank). Every rank must enter: under ZeRO-3 entering
    is a collective (the gather). ``used_ema``: the averaged weights are in ``module``. Inside, sampling is
    ``sampling.between_training_steps``: eager under ``sample.compile=auto``, nothing kept on the device after."""
    ema = find_ema(trainer)
    samples = ranks == "all" or trainer is None or trainer.global_rank == 0
    if not is_zero3(pl_module):
        if not samples:
            yield None, ema is not None
            return
        with (ema.ema_weights(pl_module) if ema is not None else nullcontext()), \
                between_training_steps(pl_module):
            yield pl_module, ema is not None
        return
    replica = replica_of(pl_module).to(pl_module.device) if samples else None
    try:
        fill_replica(pl_module, replica, ema)
        with (between_training_steps(replica) if replica is not None else nullcontext()):
            yield replica, ema is not None
    finally:
        if replica is not None:
            replica.to("cpu")  # between events the replica costs host memory, not accelerator memory
