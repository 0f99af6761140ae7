"""Randomness that survives a kill: every training step draws dropout from a generator seeded by the step.

Lightning checkpoints hold weights, optimizer, LR scheduler, loop counters, callback states and our loaders'
positions (datamodules/loader.py EpochLoader.state_dict), but not the global torch RNG. Dropout draws from that
RNG, so a resumed run would otherwise see other dropout masks than an uninterrupted one and drift away from it.
Orders and class dropout already come from ``ARModule.generator(step)``; ``step_rng`` does the same for anything
that uses the global RNG inside a training step (dropout, torch.compile's RNG ops), and restores the global state
afterwards so code outside the step sees the RNG untouched.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

STEP_RNG_SALT = 0x5EED  # keeps these seeds apart from ARModule.generator(step)'s (seed, rank, step, 0)


@contextmanager
def step_rng(seed: int, device: torch.device):
    """Run the block with the global RNG of the CPU (and of ``device`` when it is a GPU) seeded by ``seed``.

    Checkpointed activations (model.grad_checkpointing) recompute their forward inside backward with the RNG
    state they stashed at forward time, which is the seeded one: their masks match too.
    """
    devices = [device] if device.type == "cuda" else []  # other accelerators: the CPU generator only
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)  # this GPU's generator only
        yield
