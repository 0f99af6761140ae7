"""Training progress off a terminal (lightning_modules/callbacks/line_progress.py): a SLURM log gets status lines
while the run trains -- Lightning's Rich bar prints nothing to a file until the end -- with the step count, rate,
eta, the latest train/ metrics, a line per validation, and the right counts after a resume."""
from __future__ import annotations

import os
import re

import pytest

from conftest import REPO
from experiments.config import load_config

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")


def cfg_for(tmp_path, *extra):
    return load_config([DEMO], ["model.size=debug", f"out_dir={tmp_path}", f"data.root={tmp_path}/digits",
                                "trainer.global_batch_size=16", "trainer.val_every_steps=2",
                                "trainer.limit_val_batches=1", "callbacks.sample_every_steps=0", "name=lines", *extra])


def test_off_a_terminal_training_prints_status_lines_and_resumes_its_count(tmp_path, capfd, monkeypatch):
    from experiments.train import run

    monkeypatch.delenv("ROAR_PROGRESS", raising=False)  # the policy's own choice: stderr here is not a terminal
    monkeypatch.setenv("ROAR_PROGRESS_EVERY_S", "0")
    run(cfg_for(tmp_path, "trainer.max_steps=4"))
    out, err = capfd.readouterr()
    lines = [x for x in err.splitlines() if x.startswith("train: ")]
    assert [re.match(r"train: (\d+)/4 steps", x).group(1) for x in lines] == ["1", "2", "3", "4", "4"], lines
    assert re.match(r"train: 4/4 steps \(100\.0%\), [\d.]+ steps/s, elapsed 0:\d\d:\d\d, eta 0:00:00, "
                    r"train/loss [\d.]+", lines[-1]), lines[-1]
    assert [x.split(",")[0] for x in err.splitlines() if x.startswith("val: ")][:2] == ["val: step 2", "val: step 4"]
    assert re.search(r"^val: step 2, val/nll [\d.]+$", err, re.M), err
    assert "Epoch 0/-2" not in out + err  # Rich's bar is not drawn into the log

    run(cfg_for(tmp_path, "trainer.max_steps=6"))  # resume=auto: steps 5 and 6 only, counted from 4
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("train: ")]
    assert [re.match(r"train: (\d+)/6", x).group(1) for x in lines] == ["5", "6", "6"], lines


@pytest.mark.parametrize("mode, quiet, expected", [("lines", False, "lines"), ("bar", False, "Lightning's"),
                                                   ("off", False, None), ("lines", True, None)])
def test_roar_progress_picks_the_trainers_display(tmp_path, monkeypatch, mode, quiet, expected):
    from experiments.build import build_trainer
    from lightning_modules.callbacks.line_progress import LineProgressBar

    monkeypatch.setenv("ROAR_PROGRESS", mode)
    overrides = {"enable_progress_bar": False} if quiet else {}
    trainer = build_trainer(cfg_for(tmp_path), str(tmp_path / "run"), [], logger=False, **overrides)
    shown = trainer.progress_bar_callback
    kind = None if shown is None else "lines" if isinstance(shown, LineProgressBar) else "Lightning's"
    assert kind == expected


def test_only_rank_zero_prints(capsys):
    from lightning_modules.callbacks.line_progress import LineProgressBar

    class Trainer:
        max_steps, global_step, sanity_checking = 4, 0, False

    bar = LineProgressBar(every_s=0)
    bar.disable()  # what Lightning's ProgressBar.setup does on every rank but 0
    bar.on_train_start(Trainer(), None)
    bar.on_validation_end(Trainer(), None)
    bar.on_train_end(Trainer(), None)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("in_allocation", [False, True])
def test_a_log_holds_no_lightning_notice_a_user_cannot_act_on(tmp_path, in_allocation):
    """experiments/build.py quiet_lightning_notices: with `srun` on PATH (a SLURM login node) and no allocation, the
    log has neither Lightning's srun hint nor its litlogger advert; inside an allocation the srun hint stays (there
    it may be the user's mistake)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    env = subprocess_env(REPO, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)
    if in_allocation:
        env["SLURM_JOB_ID"] = "123"
    cmd = [sys.executable, "-m", "experiments.train", "-c", DEMO, "model.size=debug", f"out_dir={tmp_path}",
           f"data.root={tmp_path}/digits", "trainer.global_batch_size=8", "trainer.max_steps=2",
           "trainer.val_every_steps=2", "trainer.limit_val_batches=1", "callbacks.sample_every_steps=0", "name=n"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "litlogger" not in log and "LeafSpec" not in log and "val: step 2" in log
    assert ("`srun` command is available" in log) == in_allocation, log[-3000:]
