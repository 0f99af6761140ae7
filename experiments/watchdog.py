"""A hang ends: where every rank is, and a bounded, one-line end when a rank stops making progress.

``trainer.collective_timeout_s`` = T (default 1800 s) bounds how long any rank may go without *progress*, i.e.
without Lightning starting or finishing a profiled action: every callback and module hook, the training /
validation step, backward, the optimizer step, each dataloader fetch (the FID callback adds one action per
sampling batch). ``Watchdog`` is the trainer's profiler -- Lightning already wraps each of those calls in
``profiler.profile(name)`` -- so "where" is exact: the innermost action (``[Callback]SampleGrid.on_train_batch_end``)
and the step.

With more than one rank, a monitor thread per rank ends a rank that made no progress for T, whatever it is stuck
in (a collective whose peer never comes, or a peer stuck outside any collective):

    error: rank 1: no progress for 20 s (trainer.collective_timeout_s=20) at step 2 in [Callback]Stall.on_train_batch_start; rank 0 at step 2 in ... > [Strategy]DDPStrategy.backward for 19 s

then SIGKILLs the ranks this process launched (Lightning's ``launcher.kill``) and exits 1; when the stuck rank is
a launched one, Lightning's child-process observer ends the launcher in turn. One line for the run: the first
rank to give up prints it (a shared store counter; the others wait, bounded, until it is written before they kill
anything), and a rank defers briefly to a peer that stopped earlier, i.e. to the stuck rank rather than one waiting
for it. The line is written on a line of its own in one write (``experiments.cli.say``): rank 0's progress bar
shares the stream. Each rank publishes its location
to the process group's store, a server thread in rank 0's process that answers while the main threads are stuck,
which is how the line names the peers' locations. The process groups (DDP, DeepSpeed) get the timeout
T + max(60 s, T/10) (``process_group_timeout``): the monitor, which knows where, speaks first on every backend
(NCCL's own watchdog aborts without saying where); the process-group timeout is the backstop, and bounds the
rendezvous before the monitor starts. A collective error that reaches Python first (gloo raises at once when a
peer dies) becomes the same kind of line through ``describe_failure`` (experiments/train.py).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from datetime import timedelta

import lightning as L
from lightning.pytorch.profilers import Profiler

from experiments.cli import say

STORE_KEY = "roar/where/{}"
# how gloo / NCCL errors read when they are not torch.distributed.DistError (a DataLoader timeout is not one)
COLLECTIVE_MARKERS = ("gloo", "nccl", "timed out waiting", "connection closed by peer", "connection reset by peer")


def process_group_timeout(timeout_s: float) -> timedelta:
    """The DDP / DeepSpeed process-group timeout for trainer.collective_timeout_s (see the module docstring)."""
    return timedelta(seconds=float(timeout_s) + max(60.0, float(timeout_s) / 10))


def launched(trainer) -> list:
    """The rank processes this process started (Lightning's subprocess launcher), [] elsewhere."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return list(getattr(launcher, "procs", None) or [])


def kill_launched(trainer, signum: int) -> None:
    procs = launched(trainer)
    if procs:
        trainer.strategy.launcher.kill(signum)  # Lightning's own: send_signal to each child it started
    if signum == signal.SIGKILL:
        for p in procs:  # reap them: a killed child left unwaited stays a zombie once this process is gone
            try:
                p.wait(timeout=5)
            except Exception:  # noqa: BLE001 - best effort: it was SIGKILLed
                pass


def reap_launched(trainer, wait_s: float) -> None:
    """Wait up to ``wait_s`` for the launched ranks to exit, then SIGKILL the rest: none outlives the launcher."""
    procs = launched(trainer)
    deadline = time.monotonic() + max(0.0, wait_s)
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    if any(p.poll() is None for p in procs):
        kill_launched(trainer, signal.SIGKILL)


def _short(action: str) -> str:
    return re.sub(r"\{.*\}", "", action)  # drop a callback's state key ("ModelCheckpoint{'monitor': ...}")


def _store():
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store  # no public accessor for it

        return _get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - diagnostics only: the line then names this rank alone
        return None


class Watchdog(Profiler):
    """Profiler that records where this rank is, plus the per-rank no-progress monitor (armed by WatchdogHooks)."""

    def __init__(self, timeout_s: float, poll_s: float | None = None):
        super().__init__()
        self.timeout_s = float(timeout_s)
        self.poll_s = poll_s or max(0.5, min(5.0, self.timeout_s / 10))
        self.stack: list[str] = []
        self.last_started = "start-up"
        self.failed: tuple[BaseException, str] | None = None  # the latest exception and the innermost action it left
        self.progress = time.monotonic()
        self.trainer = None
        self.exiting = False  # the monitor is ending the process
        self._stop: threading.Event | None = None

    # -- Lightning's profiler interface: called around every hook, on the main thread
    def start(self, action_name: str) -> None:
        self.stack.append(action_name)
        self.last_started = action_name
        self.progress = time.monotonic()

    def stop(self, action_name: str) -> None:
        exc = sys.exc_info()[1]  # set while an exception unwinds the action (innermost action first)
        if exc is not None and (self.failed is None or self.failed[0] is not exc):
            self.failed = (exc, self.where())
        if action_name in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(action_name)]
        self.progress = time.monotonic()

    def summary(self) -> str:
        return ""  # nothing to report: this profiler only locates ranks

    # -- where
    @property
    def rank(self) -> int:
        return getattr(self.trainer, "global_rank", 0)

    def where(self) -> str:
        step = getattr(self.trainer, "global_step", 0)
        stack = list(self.stack) or [f"after {self.last_started}"]
        return f"step {step} in " + " > ".join(_short(a) for a in stack[-3:])

    def peer_states(self) -> dict[int, tuple[str, float]]:
        """{rank: (where, wall time of its last progress)} for every other rank that published."""
        store, world, out = _store(), getattr(self.trainer, "world_size", 1), {}
        for r in range(world if store is not None else 0):
            key = STORE_KEY.format(r)
            try:
                if r != self.rank and store.check([key]):  # check first: get() would wait for a missing key
                    where, since = store.get(key).decode().rsplit("|", 1)
                    out[r] = (where, float(since))
            except Exception:  # noqa: BLE001 - a dead store (rank 0 gone) just shortens the line
                return {}
        return out

    def peers(self) -> str:
        """'; rank 1 at step 2 in ... for 12 s' for every other rank that published, grouped by location."""
        groups: dict[str, list[int]] = {}
        for r, (where, since) in self.peer_states().items():
            groups.setdefault(f"at {where} for {time.time() - since:.0f} s", []).append(r)
        return "".join(f"; rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))} {w}" for w, rs in groups.items())

    def failed_in(self, err: BaseException) -> str:
        """Where ``err`` left the innermost profiled action (a handled StopIteration elsewhere does not count)."""
        return self.failed[1] if self.failed is not None and self.failed[0] is err else self.where()

    def describe_failure(self, err: BaseException) -> str:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:240]
        return (f"rank {self.rank}: a collective failed at {self.failed_in(err)} "
                f"(trainer.collective_timeout_s={self.timeout_s:g}): {first}{self.peers()}")

    # -- the monitor
    def arm(self, trainer) -> None:
        self.trainer, self.failed, self.progress = trainer, None, time.monotonic()
        if trainer.world_size < 2 or self._stop is not None:
            return  # one rank: no peer to wait for, so nothing a timeout could end
        self._stop = threading.Event()
        threading.Thread(target=self._monitor, args=(self._stop,), name="roar-watchdog", daemon=True).start()

    def disarm(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def _monitor(self, stop: threading.Event) -> None:
        published = None
        while not stop.wait(self.poll_s):
            progress = self.progress
            idle, where = time.monotonic() - progress, self.where()
            if (where, progress) != published and self._publish(where, time.time() - idle):
                published = (where, progress)
            if idle > self.timeout_s and not stop.is_set():
                reported = self._reports(0)
                if not reported and self._defer(idle):
                    continue
                self.exiting = True
                if not reported and self._reports(1) == 1:  # one line: the ranks waiting would say the same
                    say(f"error: rank {self.rank}: no progress for {idle:.0f} s (trainer.collective_timeout_s="
                        f"{self.timeout_s:g}) at {where}{self.peers()}", alone=True)
                    self._set(STORE_KEY.format("said"), str(self.rank))  # else the others wait out the bound
                else:  # the rank that counted itself first may be between the count and its line: killing it now
                    self._await_said(2 * self.poll_s + 1.0)  # (the launcher SIGKILLs its ranks) would lose the line
                kill_launched(self.trainer, signal.SIGKILL)
                os._exit(1)  # from this thread: the main thread may be blocked in C++ for good

    def _defer(self, idle: float) -> bool:
        """Leave the line to a peer that stopped progressing earlier -- the stuck rank rather than one waiting for
        it -- for at most two more polls (it may be dead and unable to speak)."""
        if idle > self.timeout_s + 2 * self.poll_s:
            return False
        mine = time.time() - idle
        return any(since < mine - 0.001 for _, since in self.peer_states().values())

    def claim_line(self) -> bool:
        """Whether this rank is the first to report the run's failure (then it writes the one line; the others
        keep quiet). A collective error that reaches Python usually follows a peer that already wrote its line."""
        return self._reports(1) == 1

    def _reports(self, add: int) -> int:
        """The ranks' shared count of failure lines printed (an atomic store counter), after adding ``add``."""
        store = _store()
        try:
            return store.add(STORE_KEY.format("failed"), add) if store is not None else add
        except Exception:  # noqa: BLE001 - no store: every rank speaks for itself
            return add

    def _await_said(self, bound_s: float) -> None:
        """Wait (at most ``bound_s``) until the reporting rank has written its line; a dead store ends the wait."""
        store, deadline = _store(), time.monotonic() + bound_s
        while store is not None and time.monotonic() < deadline:
            try:
                if store.check([STORE_KEY.format("said")]):
                    return
            except Exception:  # noqa: BLE001 - rank 0's store is gone: nobody is left to wait for
                return
            time.sleep(0.05)

    def _publish(self, where: str, since: float) -> bool:
        return self._set(STORE_KEY.format(self.rank), f"{where}|{since}")

    @staticmethod
    def _set(key: str, value: str) -> bool:
        """``key`` = ``value`` in the process group's store; False when there is none (or it is gone)."""
        store = _store()
        try:
            if store is not None:
                store.set(key, value)
                return True
        except Exception:  # noqa: BLE001 - diagnostics only
            pass
        return False


class WatchdogHooks(L.Callback):
    """Gives the Watchdog its trainer and runs its monitor from set-up to teardown of every fit / validate."""

    def __init__(self, watchdog: Watchdog):
        self.watchdog = watchdog

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.watchdog.arm(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.watchdog.disarm()


def is_collective_failure(err: BaseException) -> bool:
    """A process-group error (timeout, dead peer), as gloo / NCCL / the store raise it."""
    try:
        from torch.distributed import DistError

        if isinstance(err, DistError):
            return True
    except ImportError:
        pass
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in COLLECTIVE_MARKERS)


class CollectiveFailure(RuntimeError):
    """A collective timed out or lost a peer; ``str()`` is the one line naming the rank and where, or "" when another
    rank has already written the run's line (this rank's error is the consequence: that rank ended)."""
