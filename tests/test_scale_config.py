"""Scale-out without launching anything: trainer presets, the DeepSpeed config per ZeRO stage, the CPU strategy
subclass, the run-time batch-layout check, the launcher's plan and the export format (in-process, seconds)."""
from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

from experiments.config import load_config, run_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "configs", "debug_raster.yaml")
TRAINER = os.path.join(REPO, "experiments", "configs", "trainer")
CPU2 = ["trainer.devices=2", "trainer.accelerator=cpu"]

EXPECTED = {  # preset -> (dotted key, value it sets)
    "single": ("trainer.devices", 1), "ddp": ("trainer.strategy", "ddp"),
    "deepspeed_zero2": ("trainer.strategy", "deepspeed_stage_2"),
    "deepspeed_zero3": ("trainer.strategy", "deepspeed_stage_3"),
    "deepspeed_zero3_offload": ("trainer.strategy", "deepspeed_stage_3_offload"),
    "bf16": ("trainer.precision", "bf16-mixed"), "grad_ckpt": ("model.grad_checkpointing", True),
}


def cfg_with(preset: str, *overrides: str):
    return load_config([DEBUG, os.path.join(TRAINER, f"{preset}.yaml")], list(overrides))


def test_every_trainer_preset_layers_over_a_model_preset():
    found = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(TRAINER, "*.yaml")))
    assert found == sorted(EXPECTED)
    for preset, (key, value) in EXPECTED.items():
        cfg = cfg_with(preset)  # schema keys only: an unknown key would raise here
        section, leaf = key.split(".")
        assert cfg[section][leaf] == value, preset
        assert cfg.model.size == "debug"  # the model preset underneath survives


@pytest.mark.parametrize("preset,stage,offload", [("deepspeed_zero2", 2, False), ("deepspeed_zero3", 3, False),
                                                  ("deepspeed_zero3_offload", 3, True)])
def test_deepspeed_config_follows_the_experiment_config(preset, stage, offload):
    from experiments.strategies import deepspeed_config

    # global 16 over 2 ranks with micro 4: accumulation 2 (Lightning passes that to DeepSpeed itself)
    cfg = cfg_with(preset, *CPU2, "trainer.micro_batch_size=4", "optim.grad_clip=0.5", "optim.lr=2e-4",
                   "optim.betas=[0.9,0.96]", "optim.weight_decay=0.03", "trainer.max_steps=100",
                   "optim.warmup_steps=0.1")
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 4 and "gradient_accumulation_steps" not in ds
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False}
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    # the optimizer and LR schedule are ours under every strategy (ARModule.configure_optimizers): with offload
    # as DeepSpeedCPUAdam, flagged by the builder; DeepSpeed's config declares neither
    assert "optimizer" not in ds and "scheduler" not in ds
    from experiments.build import build_lightning_module

    module = build_lightning_module(cfg, (4, 4))
    assert module.cpu_adam == offload
    assert deepspeed_config(cfg_with(preset, *CPU2, "trainer.precision=bf16-mixed"))["bf16"] == {"enabled": True}


def test_cpu_strategy_is_a_minimal_subclass_and_gpu_gets_the_stock_one():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from experiments.strategies import deepspeed_strategy

    cpu = deepspeed_strategy(cfg_with("deepspeed_zero2", *CPU2))
    assert isinstance(cpu, DeepSpeedStrategy) and type(cpu) is not DeepSpeedStrategy
    overridden = {k for k in vars(type(cpu)) if not k.startswith(("__", "_abc"))}
    # ENVIRONMENT.md §3's three, plus the inference engine that trainer.validate() after fit builds
    assert overridden == {"setup_environment", "setup_distributed", "_setup_model_and_optimizer",
                          "_initialize_deepspeed_inference"}
    assert cpu.config["zero_optimization"]["stage"] == 2
    # construction never touches CUDA, so the GPU branch is checkable here (fit would need a GPU)
    gpu = deepspeed_strategy(cfg_with("deepspeed_zero3", "trainer.devices=2", "trainer.accelerator=gpu"))
    assert type(gpu) is DeepSpeedStrategy and gpu.config["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="trainer.precision"):
        deepspeed_strategy(cfg_with("deepspeed_zero2", *CPU2, "trainer.precision=16-mixed"))


def fake_trainer(world: int, micro: int, accumulate: int):
    return SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate, is_global_zero=True, global_step=0,
                           global_rank=0, datamodule=SimpleNamespace(batch_size=micro))


def test_batch_layout_check_names_the_mismatch():
    from experiments.strategies import BatchLayoutCheck

    BatchLayoutCheck(16, 2, quiet=True).on_train_start(fake_trainer(2, 4, 2), None)  # 4 x 2 x 2 = 16
    with pytest.raises(RuntimeError, match="ntasks-per-node"):  # SLURM started fewer ranks than configured
        BatchLayoutCheck(16, 4, quiet=True).on_train_start(fake_trainer(2, 4, 2), None)
    with pytest.raises(RuntimeError, match="global_batch_size: 16 != per-device batch 4 x world 2 x accumulation 1"):
        BatchLayoutCheck(16, 2, quiet=True).on_train_start(fake_trainer(2, 4, 1), None)
    check = BatchLayoutCheck(16, 2, quiet=True)
    check.on_train_start(fake_trainer(2, 8, 1), None)
    with pytest.raises(RuntimeError, match="got a batch of 5"):
        check.on_train_batch_start(fake_trainer(2, 8, 1), None, {"label": torch.zeros(5)}, 0)


def test_launch_dry_run_plans_the_cartesian_sweep_with_deterministic_names(capsys):
    from experiments.launch import main

    argv = ["-c", DEBUG, "trainer.accelerator=cpu", "--sweep", "seed=0,1", "--sweep", "model.variant=raster,rar",
            "--gpus-per-node", "2", "--dry-run", "out_dir=/tmp/roar-plan"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same plan, same names, every time
    lines = [ln.split() for ln in first.splitlines()[1:]]
    assert len(lines) == 4 and "4 job(s), 1 node(s) x 2 task(s)" in first
    for (name, run_dir, seed, variant) in lines:
        cfg = load_config([DEBUG], ["trainer.accelerator=cpu", seed, variant, "trainer.num_nodes=1",
                                    "trainer.devices=2"])
        assert name == run_name(cfg) and run_dir == f"/tmp/roar-plan/{name}"
    with pytest.raises(SystemExit):  # two points with one name would share (and clobber) a run folder
        main(["-c", DEBUG, "--sweep", "seed=0,0", "--dry-run"])
    assert "same run name" in capsys.readouterr().err


def test_export_of_a_lightning_ckpt_takes_the_ema_weights(tmp_path):
    from safetensors.torch import load_file

    from experiments.build import build_lightning_module
    from experiments.checkpoints import load_generator
    from experiments.export import export, main

    cfg = load_config([DEBUG], [])
    module = build_lightning_module(cfg, (8, 8))
    shadow = {n: torch.full_like(p, 0.25) for n, p in module.backbone.named_parameters()}
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\nmodel: {size: debug}\n")
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {k: v.to(torch.bfloat16) for k, v in module.state_dict().items()},
                "hyper_parameters": dict(module.hparams), "global_step": 7,
                "roar": {"tokenizer_fingerprint": module.tokenizer_fingerprint, "vocab_size": 17},
                "callbacks": {"EMA": {"decay": 0.9, "updates": 7, "shadow": shadow}}}, ckpt)
    info = export(str(ckpt), str(tmp_path / "ema"))
    assert info["ema"] and info["global_step"] == 7 and info["config"]["model"]["size"] == "debug"
    on_disk = json.loads((tmp_path / "ema" / "roar.json").read_text())
    # the import-folder contract of experiments.checkpoints
    assert on_disk["weights"] == "model.safetensors" and on_disk["tokenizer"]["build"] == {"kind": "pixel",
                                                                                          "levels": 17}
    assert on_disk["model"]["size"] == "debug" and "sample" in on_disk and on_disk["vocab_size"] == 17
    weights = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # bf16 in, fp32 out
    assert torch.equal(weights["output.weight"], shadow["output.weight"])
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "live"), "--no-ema"]) == 0  # the CLI
    assert json.loads((tmp_path / "live" / "roar.json").read_text())["ema"] is False
    assert not torch.equal(load_file(str(tmp_path / "live" / "model.safetensors"))["output.weight"],
                           shadow["output.weight"])
    loaded = load_generator(str(tmp_path / "ema"))
    assert torch.equal(loaded.backbone.output.weight, shadow["output.weight"])


def test_export_refuses_what_it_cannot_read(tmp_path, capsys):
    from experiments.export import main

    assert main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "dir.ckpt").mkdir()
    assert main(["--ckpt", str(tmp_path / "dir.ckpt"), "--out", str(tmp_path / "x")]) == 2
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    assert main(["--ckpt", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "not found" in err[0] and "not a DeepSpeed checkpoint" in err[1]
    assert "not a roar generator checkpoint" in err[2]


def test_slurm_requeue_only_flags_in_the_handler_and_saves_at_the_next_step(tmp_path):
    import signal

    from experiments.strategies import SlurmRequeue

    saved = []
    trainer = SimpleNamespace(global_step=3, world_size=1, is_global_zero=False,  # rank != 0: no scontrol here
                              save_checkpoint=saved.append)
    module = SimpleNamespace(device=torch.device("cpu"))
    before = signal.getsignal(signal.SIGUSR1)
    requeue = SlurmRequeue(str(tmp_path / "last.ckpt"))
    requeue.setup(trainer, module, "fit")
    requeue.on_train_batch_end(trainer, module, None, None, 0)
    assert saved == []  # no signal yet
    os.kill(os.getpid(), signal.SIGUSR1)  # the handler only flags: no checkpoint inside it
    assert requeue.flagged and saved == []
    requeue.on_train_batch_end(trainer, module, None, None, 1)  # same optimizer step: not checked twice
    trainer.global_step = 4
    requeue.on_train_batch_end(trainer, module, None, None, 2)
    trainer.global_step = 5
    requeue.on_train_batch_end(trainer, module, None, None, 3)
    assert saved == [str(tmp_path / "last.ckpt")]  # once, at the first step after the signal
    requeue.teardown(trainer, module, "fit")
    assert signal.getsignal(signal.SIGUSR1) == before
