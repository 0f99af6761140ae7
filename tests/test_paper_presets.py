"""Every paper preset, shrunk to the debug size on the embedded digits but keeping its own callbacks (sample grid,
order map, EMA: whatever it turns on), trains a few steps on 2 CPU ranks under each trainer preset its header
documents ("# trainer presets: ..."), its sample grid included. This is the path a cluster run takes at step
5000, where a grid that only rank 0 samples used to hang ZeRO-3."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

PRESETS = sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "configs", "*_*.yaml"))
                 if not os.path.basename(p).startswith("debug_"))
ENV = subprocess_env(REPO, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def documented_trainers(path: str) -> list[str]:
    text = open(path).read()
    m = re.search(r"^# trainer presets: ([a-z0-9_, ]+)", text, re.M)
    assert m, f"{path}: its header names no trainer presets"
    return [t.strip() for t in m.group(1).split(",")]


CASES = [(os.path.basename(p)[:-5], t) for p in PRESETS for t in documented_trainers(p)]
SHRINK = ["model.size=debug", "model.num_classes=10", "tokenizer.kind=pixel", "tokenizer.path=",
          "data.kind=embedded", "data.code_dir=", "data.image_size=8", "data.num_workers=0", "sample.num_steps=0",
          "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=4", "trainer.global_batch_size=8",
          "trainer.val_every_steps=2", "trainer.ckpt_every_steps=2", "trainer.log_every_steps=1",
          "trainer.limit_val_batches=1", "trainer.precision=32-true", "optim.warmup_steps=0.25",
          "callbacks.sample_every_steps=2", "callbacks.sample_classes=[0,1]", "callbacks.sample_per_class=1",
          "resume=never"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset,trainer", CASES, ids=[f"{p}+{t}" for p, t in CASES])
def test_paper_preset_runs_on_two_ranks_with_its_callbacks(preset, trainer, tmp_path):
    from experiments.config import load_config

    layers = [os.path.join(REPO, "experiments", "configs", f"{preset}.yaml"),
              os.path.join(REPO, "experiments", "configs", "trainer", f"{trainer}.yaml")]
    own = load_config(layers)  # the preset's own callbacks, kept (only their cadence shrinks)
    extra = ["callbacks.order_map_every_steps=2"] if own.callbacks.order_map_every_steps else []
    args = [sys.executable, "-m", "experiments.train", *sum((["-c", p] for p in layers), []), *SHRINK, *extra,
            f"out_dir={tmp_path}", "name=run", f"data.root={tmp_path}/digits"]
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, f"{preset} + {trainer}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["val_nll_bits"] is not None
    assert sorted(os.listdir(run / "samples")) == ["step_000002.png", "step_000004.png"]  # written once, rank 0
    if extra:
        assert any(f.endswith("map.png") for f in os.listdir(run / "order"))
