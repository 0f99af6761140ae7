"""Checkpoint IO that never leaves a half-written file, and loads with weights_only=True.

A kill during a save leaves the previous ``last.ckpt`` intact: we write ``<path>.tmp-<pid>``, fsync it, then
``os.replace`` it over the target (atomic on POSIX file systems).
"""
from __future__ import annotations

import os

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        if not os.path.isfile(str(path)):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return torch.load(str(path), map_location=map_location or "cpu", weights_only=True)


def find_resume_checkpoint(resume: str, run_dir: str) -> str | None:
    """resume=auto -> <run>/checkpoints/last.ckpt when it exists; never -> None; else the given path."""
    if resume == "never":
        return None
    if resume == "auto":
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        return last if os.path.isfile(last) else None
    if not os.path.exists(resume):
        raise FileNotFoundError(f"resume: checkpoint not found: {resume}")
    return resume
