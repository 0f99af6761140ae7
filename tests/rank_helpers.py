"""Fault injection for the multi-rank tests, loaded into every rank through the documented extra-callbacks hook
(experiments/build.py::extra_callbacks; the ranks Lightning launches inherit the environment):

    ROAR_EXTRA_CALLBACKS=rank_helpers:from_env   (with tests/ on PYTHONPATH)
    ROAR_TEST_DIR=DIR       each rank writes DIR/rank<r>.pid at set-up and DIR/rank<r>.step after every step
    ROAR_TEST_STALL=R:S:T   rank R sleeps T seconds at the start of step S, outside any collective, after
                            writing DIR/rank<R>.stalled
"""
from __future__ import annotations

import os
import time

from lightning.pytorch import Callback


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # readers never see half a number


class RankProbe(Callback):
    def __init__(self, out_dir: str, stall: tuple[int, int, float] | None = None):
        self.out_dir, self.stall = out_dir, stall
        os.makedirs(out_dir, exist_ok=True)

    def setup(self, trainer, pl_module, stage: str) -> None:
        _write(os.path.join(self.out_dir, f"rank{trainer.global_rank}.pid"), str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stall and trainer.global_rank == self.stall[0] and trainer.global_step == self.stall[1]:
            _write(os.path.join(self.out_dir, f"rank{trainer.global_rank}.stalled"), str(trainer.global_step))
            time.sleep(self.stall[2])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _write(os.path.join(self.out_dir, f"rank{trainer.global_rank}.step"), str(trainer.global_step))


def from_env() -> RankProbe:
    stall = os.environ.get("ROAR_TEST_STALL")
    parsed = None
    if stall:
        rank, step, seconds = stall.split(":")
        parsed = (int(rank), int(step), float(seconds))
    return RankProbe(os.environ["ROAR_TEST_DIR"], parsed)
