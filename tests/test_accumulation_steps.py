"""Gradient accumulation (trainer.micro_batch_size below the per-device batch): one optimizer step is several
micro-batches, and it must behave as one step of the whole batch.

- Random draws: each micro-batch draws its own orders and class-dropout masks from (seed, rank, step, micro-batch);
  reusing the step's generator gave every micro-batch the same orders (RandAR 16 = 4 x 4: 4 distinct orders, not 16).
  Without accumulation the draws are those every earlier run made; a run resumed after a kill mid-accumulation
  draws what an uninterrupted one does.
- Non-finite losses: one bad micro-batch skips the whole step (the finite micro-batches' gradients are dropped, so
  weights and optimizer state stay bit-identical), counted once per step, and the streak counts steps in a row.
  Without the fix the optimizer stepped on the finite part, and a 4-micro-batch step counted as 4 in a row."""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from conftest import REPO
from experiments.config import load_config

RANDAR = os.path.join(REPO, "experiments", "configs", "debug_randar.yaml")
DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")


def train(tmp_path, config: str, name: str, *extra, callbacks=(), forward_hook=None):
    """experiments.train.run with ``callbacks`` added and ``forward_hook`` on the backbone; the builders are
    restored afterwards (not monkeypatch: the order spies must outlive one run)."""
    import experiments.build as B
    from experiments.train import run

    real_module, real_callbacks = B.build_lightning_module, B.build_callbacks

    def module_with_hook(cfg, grid):
        module = real_module(cfg, grid)
        if forward_hook is not None:
            module.backbone.register_forward_hook(forward_hook)
        return module

    B.build_lightning_module = module_with_hook
    B.build_callbacks = lambda cfg, run_dir: [*real_callbacks(cfg, run_dir), *callbacks]
    overrides = ["model.size=debug", f"out_dir={tmp_path}", f"data.root={tmp_path}/digits", f"name={name}",
                 "trainer.accelerator=cpu", "trainer.val_every_steps=1000", "trainer.limit_val_batches=1",
                 "callbacks.sample_every_steps=0", "optim.warmup_steps=0", *extra]
    try:
        return run(load_config([config], overrides), quiet=True)
    finally:
        B.build_lightning_module, B.build_callbacks = real_module, real_callbacks


# ----------------------------------------------------------------------------- random draws per micro-batch
@pytest.fixture
def recorded_orders(monkeypatch):
    """{step: [order rows]} of the orders training steps draw (not validation's, not the FLOP probe's)."""
    from lightning_modules.base import ARModule
    from lightning_modules.ordering import AnyOrder

    rows: dict[int, list[tuple]] = {}
    inside = []
    real_loss_on, real_order = ARModule.loss_on, AnyOrder.train_order

    def loss_on(self, codes, labels, step, generator):
        inside.append(step)
        try:
            return real_loss_on(self, codes, labels, step, generator)
        finally:
            inside.pop()

    def train_order(self, batch, step, generator, device=None):
        order = real_order(self, batch, step, generator, device)
        if inside:
            rows.setdefault(step, []).extend(tuple(r) for r in order.tolist())
        return order

    monkeypatch.setattr(ARModule, "loss_on", loss_on)
    monkeypatch.setattr(AnyOrder, "train_order", train_order)
    return rows


def test_micro_batches_of_one_step_draw_their_own_orders(tmp_path, recorded_orders):
    train(tmp_path, RANDAR, "acc", "trainer.max_steps=2", "trainer.global_batch_size=16",
          "trainer.micro_batch_size=4")
    assert sorted(recorded_orders) == [0, 1]
    for step, rows in recorded_orders.items():
        assert len(rows) == 16
        assert len(set(rows)) == 16, f"step {step}: {len(set(rows))} distinct orders among 16 samples"


def test_without_accumulation_the_draws_are_those_of_earlier_runs(tmp_path, recorded_orders):
    from lightning_modules.base import derive_seed, make_generator
    from lightning_modules.ordering import AnyOrder

    train(tmp_path, RANDAR, "plain", "trainer.max_steps=2", "trainer.global_batch_size=16", "seed=5")
    ordering = AnyOrder((8, 8), max_steps=2)
    for step in (0, 1):  # the seed runs have always used: (seed, rank, step, 0)
        g = make_generator(derive_seed(5, 0, step, 0))
        torch.rand(16, generator=g)  # the class-dropout draws come first (model.class_dropout > 0)
        want = ordering.train_order(16, step, g).tolist()
        assert recorded_orders[step] == [tuple(r) for r in want]


class Killed(RuntimeError):
    pass


class StopMidStep(L.Callback):
    """A kill between two micro-batches of ``step``: after its checkpoint, before the step's optimizer update."""

    def __init__(self, step: int, micro: int):
        self.step, self.micro = step, micro

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and batch_idx % trainer.accumulate_grad_batches == self.micro:
            raise Killed


def test_a_run_resumed_after_a_kill_mid_accumulation_draws_the_same(tmp_path, recorded_orders):
    common = ["trainer.max_steps=4", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
              "trainer.ckpt_every_steps=2"]
    train(tmp_path, RANDAR, "whole", *common)
    whole = dict(recorded_orders)
    recorded_orders.clear()
    with pytest.raises(Killed):
        train(tmp_path, RANDAR, "killed", *common, callbacks=[StopMidStep(2, 2)])
    assert len(recorded_orders[2]) == 8  # two micro-batches of step 2 ran, then the kill
    recorded_orders.clear()
    train(tmp_path, RANDAR, "killed", *common, "resume=auto")
    assert sorted(recorded_orders) == [2, 3]
    assert recorded_orders[2] == whole[2] and recorded_orders[3] == whole[3]


# ----------------------------------------------------------------------------- a non-finite micro-batch
class PoisonAt:
    """Forward hook: NaN logits for the training forward of (step, micro-batch) in ``at``, whatever ran before
    (a skipped step need not run its later forwards, so a count of forwards would shift)."""

    def __init__(self, at):
        self.at, self.now = set(at), None

    def __call__(self, module, inputs, output):
        return output * float("nan") if module.training and self.now in self.at else None


class Watch(L.Callback):
    """Per optimizer step: did its weights and optimizer state change? Also tells PoisonAt where it is."""

    def __init__(self, poison: PoisonAt):
        self.poison, self.rows = poison, {}

    @staticmethod
    def _state(trainer, pl_module):
        weights = [v.detach().clone() for v in pl_module.backbone.state_dict().values()]
        opt = trainer.optimizers[0].state_dict()["state"]
        return weights, [v.clone() for s in opt.values() for v in s.values()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        micro = batch_idx % trainer.accumulate_grad_batches
        self.poison.now = (trainer.global_step, micro)
        if micro == 0:
            self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            (w0, o0), (w1, o1) = self.before, self._state(trainer, pl_module)
            same = len(o0) == len(o1) and all(torch.equal(a, b) for a, b in zip(w0 + o0, w1 + o1))
            self.rows[trainer.global_step - 1] = same


def nonfinite_run(tmp_path, poisoned, limit: int):
    poison = PoisonAt(poisoned)
    watch = Watch(poison)
    # 4 micro-batches of 2 per step
    result = train(tmp_path, DEMO, "nan", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
                   "trainer.max_steps=4", "trainer.ckpt_every_steps=10", f"optim.max_nonfinite_in_a_row={limit}",
                   callbacks=[watch], forward_hook=poison)
    return result, watch.rows


def test_one_nonfinite_micro_batch_skips_its_whole_step_counted_once(tmp_path):
    # step 1: every micro-batch non-finite (4 > limit 3 if counted per micro-batch); step 2: only the last one
    # (the optimizer would step on the other three's gradients)
    result, same = nonfinite_run(tmp_path, [(1, 0), (1, 1), (1, 2), (1, 3), (2, 3)], limit=3)
    assert same == {0: False, 1: True, 2: True, 3: False}, "a skipped step moved weights or optimizer state"
    assert result["nonfinite_skipped"] == 2  # two steps, not five micro-batches
    ckpt = torch.load(os.path.join(str(tmp_path), "nan", "checkpoints", "last.ckpt"), weights_only=True)
    assert ckpt["roar"]["nonfinite_total"] == 2 and ckpt["roar"]["nonfinite_streak"] == 0


def test_the_streak_counts_skipped_steps_in_a_row(tmp_path):
    from lightning_modules.base import NonFiniteLossError

    # the last micro-batch of steps 1 and 2: two skipped steps in a row, although finite micro-batches came between
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite losses in a row \(last at step 2\)"):
        nonfinite_run(tmp_path, [(1, 3), (2, 3)], limit=2)
