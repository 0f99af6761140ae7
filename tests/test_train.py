"""End-to-end training on the embedded digits: every variant trains on CPU; logs, checkpoints and metrics land
where the README says; resume=auto continues a run."""
from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import REPO
from experiments.config import ConfigError, load_config
from experiments.train import run
from lightning_modules.variants import variant_names

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")


def cfg_for(tmp_path, variant, *extra):
    return load_config([DEMO], [f"model.variant={variant}", "model.size=debug", f"out_dir={tmp_path}",
                                f"data.root={tmp_path}/digits", "trainer.global_batch_size=16", *extra])


@pytest.mark.parametrize("variant", variant_names())
def test_fast_dev_run(tmp_path, variant):
    result = run(cfg_for(tmp_path, variant, "trainer.fast_dev_run=true", "callbacks.sample_every_steps=0"), quiet=True)
    assert result["steps"] == 1 and result["train_loss"] is not None


def test_rar_vit_flavour_trains(tmp_path):
    debug = os.path.join(REPO, "experiments", "configs", "debug_rar.yaml")  # sets no llama-only options
    cfg = load_config([debug], ["model.flavour=rar_vit", "trainer.fast_dev_run=true", f"out_dir={tmp_path}",
                                f"data.root={tmp_path}/digits"])
    assert run(cfg, quiet=True)["steps"] == 1
    # the demo preset sets model.llama.* (no dropout): switching it to rar_vit leaves them unread, which is refused
    with pytest.raises(ConfigError, match="model.llama"):
        cfg_for(tmp_path, "rar", "model.flavour=rar_vit")


def test_short_run_writes_logs_samples_metrics_and_resumes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = cfg_for(tmp_path, "raster", "trainer.max_steps=6", "trainer.val_every_steps=3", "trainer.ckpt_every_steps=3",
                  "trainer.log_every_steps=1", "callbacks.sample_every_steps=3", "callbacks.sample_per_class=1",
                  "name=short", "trainer.limit_val_batches=2", "callbacks.ema_decay=0.9")
    result = run(cfg, quiet=True)
    run_dir = os.path.join(str(tmp_path), "short")
    assert result["steps"] == 6 and result["val_nll_bits"] > 0
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["step_000003.png", "step_000006.png"]
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["config_hash"] and metrics["steps"] == 6
    events = EventAccumulator(glob.glob(os.path.join(run_dir, "tb"))[0], size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"train/loss", "train/lr", "val/nll", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert "samples/grid" in events.Tags()["images"]
    assert len(events.Scalars("train/loss")) >= 5
    # resume=auto picks up last.ckpt and trains only the missing steps
    resumed = run(load_config([DEMO], [*_same(cfg), "trainer.max_steps=8"]), quiet=True)
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 8


def _same(cfg):
    from omegaconf import OmegaConf

    flat = OmegaConf.to_container(cfg)
    return [f"model.variant={flat['model']['variant']}", "model.size=debug", f"out_dir={flat['out_dir']}",
            f"data.root={flat['data']['root']}", "trainer.global_batch_size=16", "trainer.val_every_steps=3",
            "trainer.ckpt_every_steps=3", "trainer.log_every_steps=1", "callbacks.sample_every_steps=3",
            "callbacks.sample_per_class=1", "name=short", "trainer.limit_val_batches=2", "callbacks.ema_decay=0.9"]
