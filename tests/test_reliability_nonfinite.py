"""Non-finite losses: a NaN loss skips its step (no backward, no optimizer step: weights and optimizer state stay
bit-identical) and is counted (``train/nonfinite_skipped`` in TensorBoard, ``nonfinite_skipped`` in metrics.json);
optim.max_nonfinite_in_a_row of them in a row stop the run with one line naming the count and the key.

The NaN enters through the real path: a forward hook on the backbone poisons the logits of chosen training
forwards, so ARModule.loss_on computes a NaN cross-entropy and ARModule.training_step has to notice it."""
from __future__ import annotations

import glob
import json
import os

import lightning as L
import pytest
import torch

from conftest import REPO
from experiments.config import load_config

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")


class Poison:
    """Forward hook: the n-th training forward (1-based) in ``calls`` returns NaN logits."""

    def __init__(self, calls):
        self.calls, self.n, self.poisoned_now = calls, 0, False

    def __call__(self, module, inputs, output):
        if not module.training:  # validation and sampling stay clean
            return None
        self.n += 1
        self.poisoned_now = self.n in self.calls
        return output * float("nan") if self.poisoned_now else None


class Watch(L.Callback):
    """Snapshots weights and optimizer state around every training batch; records what changed."""

    def __init__(self, poison: Poison):
        self.poison, self.rows = poison, []

    @staticmethod
    def _state(trainer, pl_module):
        weights = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}
        opt = trainer.optimizers[0].state_dict()["state"]
        return weights, {i: {k: v.clone() for k, v in s.items()} for i, s in opt.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (w0, o0), (w1, o1) = self.before, self._state(trainer, pl_module)
        same_w = all(torch.equal(w0[k], w1[k]) for k in w0)
        same_o = o0.keys() == o1.keys() and all(torch.equal(o0[i][k], o1[i][k]) for i in o0 for k in o0[i])
        self.rows.append((self.poison.poisoned_now, same_w, same_o))


def poisoned_run(tmp_path, monkeypatch, calls, limit: int, *extra):
    import experiments.build as B

    poison = Poison(set(calls))
    watch = Watch(poison)
    real_module, real_callbacks = B.build_lightning_module, B.build_callbacks

    def module_with_hook(cfg, grid):
        module = real_module(cfg, grid)
        module.backbone.register_forward_hook(poison)
        return module

    monkeypatch.setattr(B, "build_lightning_module", module_with_hook)
    monkeypatch.setattr(B, "build_callbacks", lambda cfg, run_dir: [*real_callbacks(cfg, run_dir), watch])
    overrides = ["model.size=debug", f"out_dir={tmp_path}", f"data.root={tmp_path}/digits", "name=nan",
                 "trainer.accelerator=cpu", "trainer.global_batch_size=8", "trainer.max_steps=10",
                 "trainer.log_every_steps=1", "trainer.val_every_steps=10", "trainer.limit_val_batches=1",
                 "trainer.ckpt_every_steps=10", "callbacks.sample_every_steps=0", "optim.warmup_steps=0",
                 f"optim.max_nonfinite_in_a_row={limit}", *extra]
    return poison, watch, overrides


def test_nonfinite_steps_are_skipped_counted_and_leave_the_weights_alone(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from experiments.train import run

    poison, watch, overrides = poisoned_run(tmp_path, monkeypatch, {3, 4, 8}, limit=3)
    result = run(load_config([DEMO], overrides), quiet=True)

    assert [r[0] for r in watch.rows].count(True) == 3
    for poisoned, same_weights, same_optimizer in watch.rows:
        if poisoned:
            assert same_weights and same_optimizer, "a skipped step changed the weights or the optimizer state"
        else:
            assert not same_weights  # the check can fail: a normal step does move the weights
    assert result["nonfinite_skipped"] == 3 and result["train_loss"] is not None
    metrics = json.load(open(os.path.join(str(tmp_path), "nan", "metrics.json")))
    assert metrics["nonfinite_skipped"] == 3
    events = EventAccumulator(glob.glob(os.path.join(str(tmp_path), "nan", "tb"))[0], size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("train/nonfinite_skipped")]
    assert logged[-1] == 3 and logged == sorted(logged)  # a running total, logged on every step
    # the count is part of the checkpoint: a resumed run goes on counting from there
    ckpt = torch.load(os.path.join(str(tmp_path), "nan", "checkpoints", "last.ckpt"), weights_only=True)
    assert ckpt["roar"]["nonfinite_total"] == 3


def test_k_nonfinite_in_a_row_stop_the_run_with_one_line(tmp_path, monkeypatch):
    from experiments.train import run
    from lightning_modules.base import NonFiniteLossError

    _, watch, overrides = poisoned_run(tmp_path, monkeypatch, range(4, 100), limit=3)
    with pytest.raises(NonFiniteLossError) as err:
        run(load_config([DEMO], overrides), quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and "3 non-finite losses in a row" in msg and "optim.max_nonfinite_in_a_row=3" in msg
    # batches 1-3 trained, 4 and 5 were skipped without touching the weights, the 6th stopped the run
    assert [(poisoned, same) for poisoned, same, _ in watch.rows] == [(False, False)] * 3 + [(True, True)] * 2


def test_k_nonfinite_in_a_row_through_the_cli_exit_1_without_traceback(tmp_path, monkeypatch, capsys):
    from experiments.train import main

    _, _, overrides = poisoned_run(tmp_path, monkeypatch, range(1, 100), limit=2)
    with pytest.raises(SystemExit) as exit_:
        main(["-c", DEMO, *overrides])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "2 non-finite losses in a row" in lines[0] and "optim.max_nonfinite_in_a_row=2" in lines[0]
