"""Checkpoint IO that never leaves a half-written file, and loads with weights_only=True.

A kill during a save leaves the previous ``last.ckpt`` intact: we write ``<path>.tmp-<pid>``, fsync it, then
``os.replace`` it over the target (atomic on POSIX file systems). A killed save leaves its ``*.tmp-<pid>`` behind;
nothing reads those (resume=auto takes ``last.ckpt`` only), and they may be deleted by hand.
"""
from __future__ import annotations

import os
import pickle

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely; the message is one line naming the file."""


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
        try:  # the rename itself survives a power cut only once the folder is synced (a kill needs no sync)
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # some network file systems refuse fsync on a folder; the rename is still atomic
            pass

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return safe_load(path, map_location)  # weights_only=True whatever the caller asks


def safe_load(path, map_location=None):
    """torch.load with weights_only=True (a checkpoint never runs code when it is read); every way a file can fail
    to be a checkpoint is one CheckpointError line naming it."""
    if not os.path.isfile(str(path)):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(str(path), map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path}: refused by weights_only=True loading "
                              f"({str(err).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError) as err:  # truncated or not a torch file (a kill cannot cause this)
        raise CheckpointError(f"checkpoint {path}: unreadable ({str(err).splitlines()[0][:200]})") from None


def find_resume_checkpoint(resume: str, run_dir: str) -> str | None:
    """resume=auto -> <run>/checkpoints/last.ckpt when it exists; never -> None; else the given path."""
    if resume == "never":
        return None
    if resume == "auto":
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        return last if os.path.exists(last) else None  # a directory under DeepSpeed
    if not os.path.exists(resume):
        raise FileNotFoundError(f"resume: checkpoint not found: {resume}")
    return resume
