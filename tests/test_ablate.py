"""Ablation sweeps: arms expand as documented with equal compute, the first run trains and writes tables / plots /
TensorBoard images, and a second run collects the finished runs into the same table without training."""
from __future__ import annotations

import glob
import os

import pytest

from conftest import REPO
from experiments import ablate, train
from experiments.config import ConfigError

TINY = os.path.join(REPO, "experiments", "configs", "sweeps", "tiny.yaml")
DEMO = os.path.join(REPO, "experiments", "configs", "sweeps", "demo.yaml")
# the fastest sweep that still has two orderings, two decode settings and a skipped one (raster at 8 steps)
FAST = ["trainer.max_steps=2", "trainer.val_every_steps=1", "model.size=debug"]


def sweep_overrides(tmp, extractor):
    return [f"out_dir={tmp}/sweep", f"eval.extractor_weights={extractor}", "eval.fid_samples=10", "eval.batch_size=10",
            "axes.cfg_scales=[1.0]"]


@pytest.fixture(scope="module")
def extractor(quick_digits_extractor):
    return quick_digits_extractor


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, extractor):
    tmp = str(tmp_path_factory.mktemp("abl"))
    extra = FAST + [f"data.root={tmp}/digits"]
    out = ablate.run_sweep(TINY, overrides=sweep_overrides(tmp, extractor), extra=extra, log=lambda m: None)
    return tmp, extra, out


def test_sweep_arms_expand_with_equal_compute():
    sweep = ablate.load_sweep(DEMO, ["out_dir=/nowhere"])
    arms = ablate.training_arms(sweep)
    assert [a.name for a in arms] == ["raster", "rar", "randar", "arpg"]
    steps = arms[0].cfg.trainer.max_steps
    assert {(a.cfg.trainer.global_batch_size, a.cfg.trainer.max_steps) for a in arms} == {(8, steps)}
    assert all(a.run_dir == os.path.join("/nowhere", a.name) for a in arms)
    # the demo's own arms have the same config hash, so the sweep collects them instead of retraining; RAR's
    # arm_overrides (its anneal) reach both
    from experiments.config import config_hash
    from experiments.demo import arm_config

    assert config_hash(arm_config("randar", 0, "/elsewhere")) == config_hash(arms[2].cfg)
    assert config_hash(arm_config("randar", steps, "/elsewhere")) == config_hash(arms[2].cfg)
    assert config_hash(arm_config("rar", 0, "/elsewhere")) == config_hash(arms[1].cfg)
    from lightning_modules.hparams import ModelConfig

    assert list(sweep.arm_overrides) == ["rar"]
    assert arms[1].cfg.model.rar_anneal_end != ModelConfig.rar_anneal_end  # the demo's anneal, not the paper's
    assert {a.cfg.model.rar_anneal_end for a in arms if a.variant != "rar"} == {ModelConfig.rar_anneal_end}


def test_arm_overrides_reach_only_their_ordering_and_a_wrong_name_is_refused():
    from lightning_modules.hparams import ModelConfig

    sweep = ablate.load_sweep(TINY, ["out_dir=/nowhere", "axes.variants=[raster,rar,rar@zcurve]",
                                     "run_name='{variant}-s{seed}'", "arm_overrides={rar: [model.rar_anneal_end=0.6]}"])
    assert [a.cfg.model.rar_anneal_end for a in ablate.training_arms(sweep)] == [ModelConfig.rar_anneal_end, 0.6, 0.6]
    with pytest.raises(ConfigError, match="arm_overrides.rra"):
        ablate.training_arms(ablate.load_sweep(TINY, ["arm_overrides={rra: [model.rar_anneal_end=0.6]}"]))
    with pytest.raises(ConfigError, match="rar_anneal_end"):  # a key the ordering's arms do not read is refused
        ablate.training_arms(ablate.load_sweep(TINY, ["axes.variants=[raster]",
                                                      "arm_overrides={raster: [model.rar_anneal_end=0.6]}"]))
    seeds = ablate.training_arms(ablate.load_sweep(TINY, ["axes.seeds=[0,1]", "axes.sizes=[debug,small]"]))
    assert len(seeds) == 2 * 2 * 2 and len({a.name for a in seeds}) == 8


def test_a_size_override_for_every_arm_is_not_replaced_by_the_presets():
    sweep = ablate.load_sweep(DEMO, ["out_dir=/nowhere"])  # axes.sizes [small]: the axis wins, as listed
    assert {a.cfg.model.size for a in ablate.training_arms(sweep, ["model.size=debug"])} == {"small"}
    sweep = ablate.load_sweep(DEMO, ["out_dir=/nowhere", "axes.sizes=[]"])  # no axis: the caller's override holds
    assert {a.cfg.model.size for a in ablate.training_arms(sweep, ["model.size=debug"])} == {"debug"}


def test_scans_and_orderings_sweep_as_one_axis():
    sweep = ablate.load_sweep(TINY, ["out_dir=/nowhere", "axes.variants=[raster,scan@hilbert,rar@zcurve,sigma_gpt]",
                                     "run_name='{variant}-s{seed}'"])
    arms = ablate.training_arms(sweep)
    assert [a.name for a in arms] == ["raster-s0", "scan-hilbert-s0", "rar-zcurve-s0", "sigma_gpt-s0"]
    assert [(a.cfg.model.variant, a.cfg.model.scan) for a in arms] == [
        ("raster", "raster"), ("scan", "hilbert"), ("rar", "zcurve"), ("sigma_gpt", "raster")]
    with pytest.raises(ConfigError, match="model.scan"):  # a scan the ordering does not read is refused
        ablate.training_arms(ablate.load_sweep(TINY, ["axes.variants=[randar@hilbert]"]))


def test_sweep_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="axes"):
        ablate.load_sweep(TINY, ["axes.colours=[1]"])
    with pytest.raises(ConfigError, match="run_name"):
        ablate.training_arms(ablate.load_sweep(TINY, ["run_name=same", "axes.variants=[raster,rar]"]))
    with pytest.raises(ConfigError, match="eval.sample"):
        ablate.sample_extras(["sample.colour=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {variants: [raster]}\n")
    with pytest.raises(ConfigError, match="base"):
        ablate.load_sweep(str(bad))


def test_first_run_trains_and_writes_tables_plots_and_tensorboard(first_run):
    tmp, _, out = first_run
    rows = out["rows"]
    # raster runs only N = 64 steps (8 is skipped); randar runs its default (22) and 8
    assert sorted((r["variant"], r["decode_steps"]) for r in rows) == [("randar", 8), ("randar", 22), ("raster", 64)]
    assert {r["tokens_seen"] for r in rows} == {2 * 16 * 64}  # steps x global batch x tokens per image
    assert all(r["fid"] is not None and r["fid"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert "tokens seen" in out["table"] and "| 2048 |" in out["table"]
    for path in ("markdown", "csv", "json"):
        assert os.path.isfile(out[path])
    assert len(open(out["csv"]).read().splitlines()) == 1 + len(rows)
    assert sorted(os.listdir(out["plots_dir"])) == ["fid.png", "speed.png", "val_nll.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(out["tb_dir"], size_guidance={"images": 0})
    acc.Reload()
    assert {"ablation/val_nll", "ablation/fid_vs_steps", "ablation/speed_vs_steps"} <= set(acc.Tags()["images"])


def test_second_run_collects_without_training(first_run, extractor, monkeypatch):
    tmp, extra, out = first_run
    ckpts = sorted(glob.glob(os.path.join(tmp, "sweep", "*", "checkpoints", "*.ckpt")))
    mtimes = {p: os.path.getmtime(p) for p in ckpts}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was retrained")

    monkeypatch.setattr(train, "run", no_training)
    again = ablate.run_sweep(TINY, overrides=sweep_overrides(tmp, extractor), extra=extra, log=lambda m: None)
    assert again["table"] == out["table"]
    assert {p: os.path.getmtime(p) for p in ckpts} == mtimes
    collected = ablate.run_sweep(TINY, collect_only=True, overrides=sweep_overrides(tmp, extractor), extra=extra,
                                 log=lambda m: None)
    assert collected["table"] == out["table"]


def test_changed_config_is_not_finished_and_collect_only_never_trains(first_run, extractor, monkeypatch):
    tmp, extra, _ = first_run
    sweep = ablate.load_sweep(TINY, sweep_overrides(tmp, extractor))
    assert all(ablate.finished_metrics(a) for a in ablate.training_arms(sweep, extra))
    changed = ablate.training_arms(sweep, [*extra, "optim.lr=0.002"])  # another hash -> another, unfinished run
    assert not any(ablate.finished_metrics(a) for a in changed)
    monkeypatch.setattr(train, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    out = ablate.run_sweep(TINY, collect_only=True, overrides=sweep_overrides(tmp, extractor),
                           extra=[*extra, "optim.lr=0.002"], log=lambda m: None)
    assert out["rows"] == [] and len(out["missing"]) == 2
    assert "Not finished" in open(out["markdown"]).read()


def test_slurm_executor_submits_one_launch_per_unfinished_arm(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablate.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    out = ablate.run_sweep(TINY, executor="slurm", overrides=[f"out_dir={tmp_path}"], extra=FAST,
                           launch_args=["--partition=P"], log=lambda m: None)
    assert len(calls) == 2 and out["rows"] == []
    for cmd, variant in zip(calls, ("raster", "randar")):
        assert cmd[1:4] == ["-m", "experiments.launch", "-c"] and cmd[-1] == "--partition=P"
        assert os.path.basename(os.path.dirname(cmd[4])).startswith(variant) and os.path.isfile(cmd[4])


def test_sweep_reports_arms_trained_and_evaluated(first_run, extractor, monkeypatch, capsys):
    """lightning_modules/progress.py lines (the non-TTY mode, forced here) for the arms trained and evaluated."""
    monkeypatch.setenv("ROAR_PROGRESS", "lines")
    monkeypatch.setenv("ROAR_PROGRESS_EVERY_S", "0")
    tmp, extra, _ = first_run
    ablate.run_sweep(TINY, overrides=sweep_overrides(tmp, extractor), extra=extra, log=lambda m: None)  # cached
    assert "ablate: arms evaluated: 2/2 arms (100.0%)" in capsys.readouterr().err
    unfinished = ablate.training_arms(ablate.load_sweep(TINY, sweep_overrides(tmp, extractor)),
                                      [*extra, "optim.lr=0.003"])
    trained = []
    monkeypatch.setattr(train, "run", lambda cfg, quiet: trained.append(cfg.name))
    ablate.train_local(unfinished, log=lambda m: None)
    err = capsys.readouterr().err
    assert len(trained) == 2 and "ablate: arms trained: 1/2 arms" in err and "ablate: arms trained: 2/2 arms" in err
