"""Checkpoint IO that never leaves a half-written file, and loads with weights_only=True.

A kill during a save leaves the previous ``last.ckpt`` intact: we write ``<path>.tmp-<pid>``, fsync it, then
``os.replace`` it over the target (atomic on POSIX file systems). A killed save leaves its ``*.tmp-<pid>`` behind;
nothing reads those (resume=auto takes ``last.ckpt`` only), and they may be deleted by hand. DeepSpeed writes a
directory through its own engine, not a CheckpointIO: ``save_atomically`` swaps it in whole instead.

``FinalCheckpoint`` is ModelCheckpoint with ``last.ckpt`` always the final step (see its docstring).
"""
from __future__ import annotations

import os
import pickle
import shutil

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
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


def save_atomically(trainer, path: str, save=None) -> None:
    """``save(path)`` (default trainer.save_checkpoint) on every rank; a DeepSpeed checkpoint (a directory) is written
    beside ``path`` and swapped in by rank 0, so ``path`` is either the old checkpoint or the new one, never half of
    each. Files are already atomic (AtomicCheckpointIO)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    save = save or trainer.save_checkpoint
    if not isinstance(trainer.strategy, DeepSpeedStrategy):
        save(path)
        return
    partial, old = f"{path}.partial", f"{path}.old"
    if trainer.is_global_zero:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.strategy.barrier()
    save(partial)
    trainer.strategy.barrier()  # every rank's shard is on disk
    if trainer.is_global_zero:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    trainer.strategy.barrier()


class FinalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` always holds the step training ended at, written atomically.

    Lightning's own end-of-training save happens only when this process saved nothing before (``on_train_end``:
    ``not self._last_checkpoint_saved``), so with ``every_n_train_steps=5`` a 24-step run kept step 20 in
    last.ckpt: a re-run retrained 21-24 (duplicate TensorBoard points) and everything that loads last.ckpt
    (ablate, sample, demo, study) scored stale weights. Under DeepSpeed every save (periodic and final) goes
    through ``save_atomically``, as the signal-stop save does, so a kill mid-save keeps the previous directory.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key (its class name and arguments): runs checkpointed before this class resume its state
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_end(self, trainer, pl_module) -> None:
        # every rank (a collective under DeepSpeed); fast_dev_run and an already-saved step are skipped as Lightning
        # skips them. A resume of a finished checkpoint never gets here (Lightning skips the whole fit loop).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # The step of the module's last validation travels with the checkpoint: a resume of the final last.ckpt (a run
    # stopped during its final FID or sample grid) then does not validate the final step a second time (train.run).
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["roar_last_val_step"] = getattr(pl_module, "last_val_step", -1)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if hasattr(pl_module, "last_val_step"):
            pl_module.last_val_step = int(checkpoint.get("roar_last_val_step", -1))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        parent = super()._save_checkpoint  # Lightning's bookkeeping (last step saved, logger notice) stays its own
        save_atomically(trainer, filepath, save=lambda path: parent(trainer, path))
        self._last_checkpoint_saved = filepath  # not the .partial sibling DeepSpeed wrote to


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


def checkpoint_step(path: str) -> int | None:
    """The global step a checkpoint holds, None when it cannot tell (missing, unreadable). Reads the file memory-
    mapped: only the pickled metadata is read, not the weights. A DeepSpeed directory holds it in its model states."""
    if os.path.isdir(path):
        import glob

        found = sorted(glob.glob(os.path.join(path, "*", "*model_states.pt")))
        path = found[0] if found else ""
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # noqa: BLE001  any failure to read means "cannot tell": the caller trains (resumes) then
        return None
    return step if isinstance(step, int) else None


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
