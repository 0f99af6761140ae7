"""A run's end: last.ckpt holds the final step even when max_steps is no multiple of ckpt_every_steps, re-running a
finished run is a no-op that keeps its record (metrics.json, TensorBoard), and SIGTERM / Ctrl-C while any entry point
trains (ablate, demo, study, a launch job) ends in train's one line and 143 / 130, resumable."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from conftest import REPO, subprocess_env
from experiments.config import load_config

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")
TINY_SWEEP = os.path.join(REPO, "experiments", "configs", "sweeps", "tiny.yaml")


class Killer(L.Callback):
    """ROAR_EXTRA_CALLBACKS=test_reliability_stops:killer: the process signals itself once, after step KILL_STEP."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == int(os.environ["KILL_STEP"]) and not getattr(self, "fired", False):
            self.fired = True
            os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIG"]))
            time.sleep(0.5)  # the watcher thread sees it before the next step boundary


def killer() -> Killer:
    return Killer()


def cfg(tmp_path, *extra):
    return load_config([DEMO], ["model.size=debug", f"out_dir={tmp_path}", f"data.root={tmp_path}/digits",
                                "name=run", "trainer.global_batch_size=8", "trainer.val_every_steps=100",
                                "trainer.limit_val_batches=1", "callbacks.sample_every_steps=0", *extra])


def step_of(path: str) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def tb_files(run_dir: str) -> dict:
    return {f: os.path.getsize(f) for f in glob.glob(os.path.join(run_dir, "tb", "*"))}


def test_last_ckpt_is_the_final_step_and_a_finished_run_reruns_as_a_no_op(tmp_path, monkeypatch):
    from experiments.train import run

    args = ("trainer.max_steps=7", "trainer.ckpt_every_steps=5", "callbacks.sample_every_steps=7",
            "callbacks.sample_per_class=1", "callbacks.sample_classes=[0]")
    first = run(cfg(tmp_path, *args), quiet=True)
    run_dir = first["run_dir"]
    ckpts = os.path.join(run_dir, "checkpoints")
    assert step_of(os.path.join(ckpts, "last.ckpt")) == 7  # Lightning alone kept step 5 there
    assert os.path.isfile(os.path.join(ckpts, "step0000005.ckpt"))
    record, logs = open(os.path.join(run_dir, "metrics.json")).read(), tb_files(run_dir)

    def no_training(*a, **k):
        raise AssertionError("a finished run was fitted again")

    with monkeypatch.context() as m:
        m.setattr(L.Trainer, "fit", no_training)
        m.setattr(L.Trainer, "validate", no_training)
        again = run(cfg(tmp_path, *args), quiet=True)
    assert again["fit_seconds"] == first["fit_seconds"] and again["val_nll_bits"] == first["val_nll_bits"]
    assert open(os.path.join(run_dir, "metrics.json")).read() == record  # fit_seconds and all kept
    assert tb_files(run_dir) == logs  # no second validation, sample grid or hparams session

    # a run made before the final save (last.ckpt at the last multiple of ckpt_every_steps) trains its last steps
    shutil.copy(os.path.join(ckpts, "step0000005.ckpt"), os.path.join(ckpts, "last.ckpt"))
    resumed = run(cfg(tmp_path, *args), quiet=True)
    assert resumed["resumed_from"].endswith("last.ckpt") and step_of(os.path.join(ckpts, "last.ckpt")) == 7
    # another budget is not "finished": it trains on from the final checkpoint
    assert run(cfg(tmp_path, "trainer.max_steps=8", *args[1:]), quiet=True)["steps"] == 8


@pytest.fixture(scope="module")
def extractor(quick_digits_extractor):
    return quick_digits_extractor


def entry_point(which: str, tmp: str, extractor: str) -> list[str]:
    steps = "trainer.max_steps=4"
    if which == "ablate":
        return ["-m", "experiments.ablate", "-c", TINY_SWEEP, f"out_dir={tmp}/runs", "axes.variants=[raster]",
                f"eval.extractor_weights={extractor}",
                f"overrides=[model.size=debug,{steps},trainer.global_batch_size=8,trainer.val_every_steps=100,"
                f"callbacks.sample_every_steps=0,data.root={tmp}/digits]"]
    if which == "demo":  # the demo's own preset (small model), a few steps
        return ["-m", "experiments.demo", "--steps", "4", "--out", f"{tmp}/runs", "--variants", "raster",
                "--extractor", extractor]
    if which == "study":
        return ["-m", "experiments.study", "--quick", "--out", f"{tmp}/runs", "--extractor", extractor]
    # a submitit job (experiments/launch.py TrainJob); the debug executor runs it in this process
    return ["-m", "experiments.launch", "--executor", "debug", "--wait", "-c", DEMO, "model.size=debug",
            f"out_dir={tmp}/runs", "name=job", f"data.root={tmp}/digits", steps, "trainer.global_batch_size=8",
            "trainer.val_every_steps=100", "callbacks.sample_every_steps=0"]


@pytest.mark.parametrize("which,sig", [("ablate", "SIGTERM"), ("demo", "SIGINT"), ("study", "SIGTERM"),
                                       ("launch_job", "SIGTERM")])
def test_a_stop_while_an_entry_point_trains_is_one_line_and_128_plus_signal(tmp_path, extractor, which, sig):
    env = subprocess_env(os.path.dirname(os.path.abspath(__file__)),
                         ROAR_EXTRA_CALLBACKS="test_reliability_stops:killer", KILL_STEP="2", KILL_SIG=sig,
                         ROAR_PROGRESS="off", OMP_NUM_THREADS="1", ROAR_DEMO_THREADS="1")
    proc = subprocess.run([sys.executable, *entry_point(which, str(tmp_path), extractor)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("roar: ")]
    assert len(lines) == 1 and lines[0].startswith(f"roar: {sig} at step 2: every rank saved "), proc.stderr[-3000:]
    saved = lines[0].split("every rank saved ")[1].split(";")[0]
    assert step_of(saved) == 2  # resume=auto continues from it
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(saved)), "metrics.json"))


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every TensorBoard scalar of a run (all event files, in step order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: sorted((e.step, e.value) for e in acc.Scalars(t)) for t in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_a_stopped_and_resumed_run_logs_what_an_uninterrupted_one_does(tmp_path):
    """SIGTERM after step 4 (a validation and logging step): the step's train scalars and its validation are logged
    before the stop, and the resumed run's TensorBoard equals an uninterrupted run's (they used to be missing)."""
    env = subprocess_env(os.path.dirname(os.path.abspath(__file__)), ROAR_PROGRESS="off", OMP_NUM_THREADS="1")
    args = ["-m", "experiments.train", "-c", DEMO, "model.size=debug", f"data.root={tmp_path}/digits",
            "trainer.global_batch_size=8", "trainer.max_steps=8", "trainer.val_every_steps=4",
            "trainer.log_every_steps=1", "trainer.limit_val_batches=2", "callbacks.sample_every_steps=0"]
    runs = {}
    for name, kill in (("whole", None), ("stopped", "4")):
        argv = [sys.executable, *args, f"out_dir={tmp_path / name}", "name=run"]
        if kill:
            stop_env = dict(env, ROAR_EXTRA_CALLBACKS="test_reliability_stops:killer", KILL_STEP=kill,
                            KILL_SIG="SIGTERM")
            stopped = subprocess.run(argv, cwd=REPO, env=stop_env, capture_output=True, text=True, timeout=600)
            assert stopped.returncode == 143, stopped.stderr[-3000:]
            assert "roar: SIGTERM at step 4: every rank saved" in stopped.stderr
            # the validation due at step 4 ran before the stop (the whole run's first of two)
            assert _scalars(str(tmp_path / name / "run"))["val/nll"] == runs["whole"]["val/nll"][:1]
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = _scalars(str(tmp_path / name / "run"))
    exact = [t for t in runs["whole"] if t.startswith(("train/loss", "train/lr", "train/grad_norm", "val/nll"))]
    assert "val/nll" in exact and "train/loss" in exact
    for tag in exact:
        assert runs["stopped"][tag] == runs["whole"][tag], tag
    assert {t for t in runs["whole"] if t.startswith(("train/", "val/"))} <= set(runs["stopped"])
