"""Every callback on, under every strategy, with 2 CPU ranks (issue #16): sample grid and order map every 2
steps, FID/IS every 2 steps (digits extractor, 30 samples: one batch, so rank 1 has none -- unequal shares),
EMA, data statistics. DDP, DeepSpeed ZeRO-2 and ZeRO-3 train 6 steps -- ZeRO-3 stopped by SIGTERM after
step 2 (experiments/signals.py saves last.ckpt, the sharded EMA gathered into it) and run again with the same
command (resume=auto) -- and ZeRO-3 + optimizer offload 4 steps with sample.precision=bf16.

model.dim=128 / ffn_hidden=1024 make the FFN weights larger than DeepSpeed's persistence threshold (1e5
elements), so ZeRO-3 really partitions them (smaller parameters stay gathered): both kinds go through the
gathered sampling replica and the sharded EMA. The same FFN weights (2^17 entries) are what sample.kernels=auto
prepacks for oneDNN (lightning_modules/nn/onednn.py), so every sampling callback here runs the packed linears,
in fp32 and (offload) in bf16, and what trainer.kernels=auto trains through oneDNN's dense linear with its own
backward (OneDnnLinear): under DDP's buckets and ZeRO-3's gathered, partitioned parameters too. The strategies
train the same weights (to float32 summation order) and a resume is exact, so the EMA exported from ZeRO-2 /
ZeRO-3 (the latter across the stop and resume) must equal DDP's.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import EVERY_CALLBACK, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subprocess_env(REPO, PYTHONUNBUFFERED="1")
TRAIN = [sys.executable, "-m", "experiments.train", "-c", "experiments/configs/debug_raster.yaml",
         "trainer.accelerator=cpu", "trainer.devices=2", "trainer.global_batch_size=8", "trainer.limit_val_batches=1",
         "trainer.val_every_steps=1000", "trainer.ckpt_every_steps=1000", "optim.schedule=constant",
         "optim.warmup_steps=0", "model.dim=128", "model.ffn_hidden=1024", *EVERY_CALLBACK]
TOL = 1e-5  # EMA weights across strategies: float32 summation order only (measured 2.5e-7 for the live weights)


def command(out_dir, name: str, steps: int, *overrides: str) -> list[str]:
    return [*TRAIN, f"out_dir={out_dir}", f"name={name}", f"trainer.max_steps={steps}", "resume=auto", *overrides]


def train(out_dir, name: str, steps: int, *overrides: str) -> dict:
    proc = subprocess.run(command(out_dir, name, steps, *overrides), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed:\n{log[-4000:]}"
    with open(os.path.join(out_dir, name, "metrics.json")) as f:
        return json.load(f)


def stop_after_step_2(out_dir, name: str, steps: int, *overrides: str) -> None:
    """SIGTERM to the launcher once rank 0 finished step 2 (tests/rank_helpers.py records it); it must save and stop."""
    probe = os.path.join(out_dir, f"{name}-probe")
    env = subprocess_env(REPO, os.path.join(REPO, "tests"), PYTHONUNBUFFERED="1", ROAR_TEST_DIR=probe,
                         ROAR_EXTRA_CALLBACKS="rank_helpers:from_env")
    with open(os.path.join(out_dir, f"{name}-stopped.log"), "w") as log:
        proc = subprocess.Popen(command(out_dir, name, steps, *overrides), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        step, deadline = os.path.join(probe, "rank0.step"), time.monotonic() + 500
        while not (os.path.isfile(step) and int(open(step).read()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, f"{name}: no step 2"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    with open(log.name) as f:
        assert "every rank saved" in f.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("callbacks")
    metrics = {"ddp": train(out, "ddp", 6, "trainer.strategy=ddp"),
               "zero2": train(out, "zero2", 6, "trainer.strategy=deepspeed_stage_2")}
    stop_after_step_2(out, "zero3", 6, "trainer.strategy=deepspeed_stage_3")
    metrics["zero3"] = train(out, "zero3", 6, "trainer.strategy=deepspeed_stage_3")  # the same command again
    metrics["offload"] = train(out, "offload", 4, "trainer.strategy=deepspeed_stage_3_offload", "sample.precision=bf16")
    return out, metrics


def tensorboard(run_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name,steps", [("ddp", 6), ("zero2", 6), ("zero3", 6), ("offload", 4)])
def test_every_callback_writes_once_per_event_under_every_strategy(runs, name, steps):
    out, metrics = runs
    run_dir, events = str(out / name), list(range(2, steps + 1, 2))
    m = metrics[name]
    assert m["steps"] == steps and math.isfinite(m["val/fid30"]) and m["fid_eval"]["ema"] is True
    assert m["fid_eval"]["num_samples"] == 30 and m["fid_eval"]["step"] == steps
    assert m["images_seen"] == steps * 8 and m["data_skipped"] == 0  # DataStatsCallback: global over both ranks
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == [f"step_{s:06d}.png" for s in events]
    assert sorted(os.listdir(os.path.join(run_dir, "order"))) == sorted(
        f"step_{s:06d}_{kind}" for s in events for kind in ("map.png", "reveal.gif"))
    tb = tensorboard(run_dir)
    for tag in ("samples/grid", "order/map", "order/reveal"):  # rank 0 alone logs, once per event
        assert [e.step for e in tb.Images(tag)] == events, tag
    # once per event from the FID callback, then the run summary's copy of the final value at the last step
    # (experiments/tb_summary.py: the HParams tab reads a metric's last scalar), the same value
    fid = tb.Scalars("val/fid30")
    assert [e.step for e in fid] == events + [steps] and fid[-1].value == fid[-2].value
    assert "val/is30" in tb.Tags()["scalars"]
    assert tb.Scalars("data/images_seen")[-1].value == steps * 8


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ema_is_the_same_under_every_strategy_and_found_by_export_and_load_generator(runs, tmp_path):
    import torch

    from experiments.checkpoints import load_generator
    from experiments.export import export

    out, metrics = runs
    assert metrics["zero3"]["resumed_from"].endswith("last.ckpt")  # the stopped ZeRO-3 run went on from its save
    assert sorted(os.listdir(out / "zero3" / "checkpoints")) == ["last.ckpt"]  # ... and replaced it at the end
    ddp = load_generator(str(out / "ddp" / "checkpoints" / "last.ckpt"), ema=True).backbone.state_dict()
    live = load_generator(str(out / "ddp" / "checkpoints" / "last.ckpt")).backbone.state_dict()
    assert max((ddp[k] - live[k]).abs().max().item() for k in ddp) > 100 * TOL  # the EMA is not the live weights
    for name in ("zero2", "zero3", "offload"):
        info = export(str(out / name / "checkpoints" / "last.ckpt"), str(tmp_path / name))
        assert info["ema"] is True, name
        weights = load_generator(str(tmp_path / name)).backbone.state_dict()
        if name != "offload":  # offload trained 4 steps, not 6
            diff = max((weights[k] - ddp[k]).abs().max().item() for k in ddp)
            assert diff < TOL, (name, diff)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_ema_foreach_update_equals_the_per_tensor_lerp_bit_for_bit():
    """callbacks/ema.py updates every shadow with one torch._foreach_lerp_; it must be the per-tensor lerp_ exactly."""
    from types import SimpleNamespace

    import torch

    from lightning_modules.callbacks.ema import EMA

    g = torch.Generator().manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    module = SimpleNamespace(backbone=backbone)
    ema = EMA(0.9)
    ema.on_train_start(None, module)
    expected = {n: t.clone() for n, t in ema.shadow.items()}
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in backbone.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, outputs={}, batch=None, batch_idx=0)
        for n, p in backbone.named_parameters():
            expected[n].lerp_(p.detach().float(), 1.0 - 0.9)
        assert all(torch.equal(ema.shadow[n], expected[n]) for n in expected)
    assert ema.updates == 3
