"""SIGTERM / SIGINT: every rank ends within ``trainer.stop_grace_s``, after saving checkpoints/last.ckpt when it can.

Why not Lightning's handling (lightning.pytorch.trainer.connectors.signal_connector, 2.6.6): its SIGTERM handler
does forward the signal to the launched ranks, but then runs ``dist.broadcast`` inside the handler (a collective
that can interleave with the main thread's own), saves nothing, and ends fit with SIGTERMException, i.e. exit
status 0; SIGINT becomes KeyboardInterrupt (the ranks are SIGKILLed, nothing saved). And a Python signal handler
runs only when the main thread is back in the interpreter: a rank blocked in a collective never runs it, which
is why issue #16's hang also ignored `timeout`'s SIGTERM.

Here the interpreter's C-level handler writes the signal number to a pipe at once (``signal.set_wakeup_fd``) and
a thread reading that pipe acts even while the main thread is stuck. On the first SIGTERM / SIGINT it forwards
the signal to the ranks this process launched (Lightning's ``launcher.kill``, as Lightning does) and arms the
deadline. The main thread, after the next optimizer step, agrees with the other ranks (one all-reduce, as
SlurmRequeue does), every rank saves last.ckpt (a DeepSpeed directory through a ``.partial`` sibling, so a
SIGKILL during the save leaves the previous one intact) and, once Lightning has logged that step and run what is
due at it (validation, sampling callbacks), the run raises ``RunStopped`` at the next batch: exit status
128 + signal (143 / 130). A rank that Lightning's launcher started exits 0 instead, because the launcher reports
the stop and Lightning's child observer SIGKILLs the launcher as soon as a child exits non-zero. Outside the
training loop (set-up, the final validation) there is nothing new to save: the rank exits at once. At the
deadline -- or at a second signal a second or more after the first -- the thread prints one line naming where
this rank is, SIGKILLs its launched ranks and exits: no rank outlives the bound, stuck or not.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import lightning as L
import torch

from experiments.cli import say
from experiments.watchdog import kill_launched
from lightning_modules.checkpointing import save_atomically

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """Raised on every rank at the step boundary where the ranks agreed to stop; ``code``: the exit status."""

    def __init__(self, message: str, code: int, announce: bool):
        super().__init__(message)
        self.code, self.announce = code, announce  # announce: the rank that prints the line (global rank 0)


def stop_status(stop: RunStopped) -> int:
    """The stop's one line (from the rank that announces it) and its exit status, for every entry point that trains:
    experiments.{train,ablate,demo,study} and a launch job end the same way, never with RunStopped's traceback."""
    if stop.announce:
        say(str(stop), alone=True)
    return stop.code


def ends_in_one_line(main):
    """Wrap a CLI ``main(argv)``: a RunStopped (saved at a step boundary; resume=auto continues) becomes its line and
    128 + signal; Ctrl-C before any trainer took SIGINT over (set-up, a tokenizer, evaluation code that builds none)
    becomes one line and 130 instead of a KeyboardInterrupt traceback."""
    import functools

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except RunStopped as stop:
            return stop_status(stop)
        except KeyboardInterrupt:
            say("roar: SIGINT: stopped outside the training loop, nothing new to save", alone=True)
            return 128 + signal.SIGINT

    return wrapped


def launched_by_lightning(trainer) -> bool:
    """A rank that Lightning's subprocess launcher started on this node (local rank > 0, no external launcher)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = getattr(trainer.strategy, "cluster_environment", None)
    return isinstance(env, LightningEnvironment) and trainer.local_rank > 0


class _Pipe:
    """Process-wide, installed once (a process may train several runs: ablate, demo): the wakeup fd, the watcher
    thread and our handlers; each signal goes to the GracefulStop of the run being built or trained."""

    target: "GracefulStop | None" = None
    previous: dict = {}

    @classmethod
    def install(cls, target: "GracefulStop") -> None:
        cls.target = target
        if cls.previous or threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # set_wakeup_fd requires it
        cls.previous["fd"] = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for s in SIGNALS:
            cls.previous[s] = signal.signal(s, _handler)
        os.register_at_fork(after_in_child=cls.forget)  # DataLoader workers must not write to our pipe
        threading.Thread(target=cls.watch, args=(read_fd,), name="roar-signals", daemon=True).start()

    @classmethod
    def reinstall(cls) -> None:
        # Lightning registers its own SIGTERM handler when fit / validate starts (see the module docstring)
        if cls.previous and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, _handler)

    @classmethod
    def forget(cls) -> None:
        try:
            signal.set_wakeup_fd(cls.previous.get("fd", -1))
            for s in SIGNALS:
                signal.signal(s, cls.previous.get(s) or signal.SIG_DFL)
        except ValueError:  # forked from a thread other than the main one: no handlers of ours to undo there
            pass

    @classmethod
    def watch(cls, read_fd: int) -> None:
        while True:
            data = os.read(read_fd, 64)
            if cls.previous.get("fd", -1) >= 0:  # whoever had the wakeup fd before us (an event loop) still hears
                try:
                    os.write(cls.previous["fd"], data)
                except OSError:
                    pass
            for signum in data:
                if signum in SIGNALS and cls.target is not None:
                    cls.target.on_signal(signum)


def _handler(signum, frame) -> None:
    pass  # the work happens in the watcher thread; this only replaces the default action (exit / KeyboardInterrupt)


class GracefulStop(L.Callback):
    def __init__(self, ckpt_path: str, grace_s: float, watchdog=None):
        self.ckpt_path, self.grace_s, self.watchdog = ckpt_path, float(grace_s), watchdog
        self.trainer = None
        self.signum: int | None = None
        self.first_at = 0.0
        self.in_training = False
        self.finished = False  # stopped at a step boundary: the deadline has nothing left to do, a signal ends at once
        self.ending = False  # the watcher thread is ending the process (see hold_if_ending)
        self.last_step = -1
        self.pending: RunStopped | None = None  # saved at a step boundary; raised once that step is logged

    def install(self, trainer) -> None:
        """Main thread, once the Trainer exists (before fit, so the rank launch and set-up are covered too)."""
        self.trainer = trainer
        _Pipe.install(self)

    # -- on the watcher thread -------------------------------------------------------------------------------------
    def on_signal(self, signum: int) -> None:
        now = time.monotonic()
        if self.signum is not None and not self.finished:
            if now - self.first_at >= 1.0:  # not the same keypress reaching the whole process group
                self._end(signum, "second signal")
            return
        self.signum, self.first_at = signum, now
        kill_launched(self.trainer, signum)  # forward to the ranks this process started
        if not self.in_training:
            return self._end(signum, "outside the training loop, nothing new to save", force=False)
        # a rank that Lightning launched leaves the deadline to its launcher (which SIGKILLs it), so that the
        # launcher's line and exit status are the run's; it keeps its own, later, in case the launcher is gone
        grace = self.grace_s + (5.0 if self.trainer is not None and launched_by_lightning(self.trainer) else 0.0)
        timer = threading.Timer(grace, self._deadline, args=(signum,))
        timer.daemon = True
        timer.start()

    def _deadline(self, signum: int) -> None:
        if not self.finished:  # else the ranks stopped at a step boundary in time
            self._end(signum, f"no step boundary within trainer.stop_grace_s={self.grace_s:g} s")

    def _end(self, signum: int, why: str, force: bool = True) -> None:
        if self.ending:
            return
        self.ending = True
        where = f" at {self.watchdog.where()}{self.watchdog.peers()}" if self.watchdog is not None else ""
        rank = getattr(self.trainer, "global_rank", 0)
        say(f"roar: rank {rank}: {signal.Signals(signum).name}: {why}{where}; ending "
            f"{'every rank without a checkpoint' if force else 'now'}", alone=True)
        if force:
            kill_launched(self.trainer, signal.SIGKILL)
        else:  # the launched ranks got the signal too and end the same way; give them a moment
            deadline = time.monotonic() + min(5.0, self.grace_s)
            from experiments.watchdog import launched

            while any(p.poll() is None for p in launched(self.trainer)) and time.monotonic() < deadline:
                time.sleep(0.05)
            kill_launched(self.trainer, signal.SIGKILL)
        launched_child = self.trainer is not None and launched_by_lightning(self.trainer)
        os._exit(0 if launched_child and not force else 128 + signum)

    def hold_if_ending(self) -> None:
        """Main thread, on its way out with an error: when the watcher thread is already ending the process (a
        peer it SIGKILLed makes the main thread's collective fail), let it finish with its line and status."""
        if self.ending:
            threading.Event().wait(30)

    # -- the main thread: agree at a step boundary, save, stop ----------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.trainer, self.in_training = trainer, True
        _Pipe.reinstall()

    def on_validation_start(self, trainer, pl_module) -> None:
        _Pipe.reinstall()

    def on_train_end(self, trainer, pl_module) -> None:
        self.in_training = False
        if self.pending is not None:  # stopped at the last step: saved; the final validation is the re-run's
            raise self.pending

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.pending is not None:  # the stopped step is logged and validated, as an uninterrupted run's
            raise self.pending

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.in_training = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last_step:  # once per optimizer step, the same on every rank
            return
        self.last_step = trainer.global_step
        flag = torch.tensor(float(self.signum or 0), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        signum = int(flag.item())
        if not signum:
            return
        name, step = signal.Signals(signum).name, trainer.global_step
        # after a SLURM requeue its checkpoint is the resume point (docs/scale.md); do not move it
        requeued = any(type(c).__name__ == "SlurmRequeue" and getattr(c, "done", False) for c in trainer.callbacks)
        if not requeued:
            save_atomically(trainer, self.ckpt_path)
        saved = "kept the requeue checkpoint" if requeued else f"every rank saved {self.ckpt_path}"
        self.in_training, self.finished = False, True
        code = 0 if launched_by_lightning(trainer) else 128 + signum
        # raised at the next batch's start, not here: Lightning still logs this step's scalars and runs the
        # validation and callbacks due at it (the resumed run starts after it), so TensorBoard misses nothing
        self.pending = RunStopped(f"roar: {name} at step {step}: {saved}; stopped (resume=auto continues from it)",
                                  code, trainer.is_global_zero)
