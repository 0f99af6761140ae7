"""Map a validated ExperimentConfig onto constructors: module, datamodule, callbacks, trainer.

This is the only place that reads YAML-shaped config; lightning_modules/ takes plain arguments.
"""
from __future__ import annotations

import logging
import os
import warnings

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from experiments.config import batch_layout, to_plain
from lightning_modules.callbacks.ema import EMA
from lightning_modules.callbacks.sample_grid import SampleGrid
from lightning_modules.checkpointing import AtomicCheckpointIO, FinalCheckpoint
from lightning_modules.variants import build_module


def tokenizer_spec(cfg: DictConfig) -> dict:
    """The tokenizer section as constructor kwargs for tokenizers.registry.build_tokenizer."""
    t = cfg.tokenizer
    kwargs = dict(to_plain(t.options))
    if t.kind == "pixel":
        kwargs["levels"] = t.levels
    elif t.kind == "codes":
        kwargs["vocab_size"] = t.vocab_size
    else:
        kwargs["path"] = t.path
    return {"build": {"kind": t.kind, **kwargs}}


def build_lightning_module(cfg: DictConfig, grid: tuple[int, int]):
    """The variant's module from the config's typed sections (the module re-types them: same dataclasses)."""
    return build_module(to_plain(cfg.model), tokenizer_spec(cfg), optim=to_plain(cfg.optim),
                        sample=to_plain(cfg.sample), seed=cfg.seed, max_steps=cfg.trainer.max_steps, grid=grid,
                        compile=cfg.trainer.compile, kernels=cfg.trainer.kernels,
                        # ZeRO-Offload takes only DeepSpeed's CPU Adam as its client optimizer (strategies.py)
                        cpu_adam=cfg.trainer.strategy.endswith("_offload"))


def build_datamodule(cfg: DictConfig, micro_batch: int):
    """-> (datamodule, code grid (h, w))."""
    d = cfg.data
    common = dict(batch_size=micro_batch, num_workers=d.num_workers, seed=cfg.seed,
                  samples_per_epoch=d.samples_per_epoch or None, persistent_workers=d.num_workers > 0)
    if d.kind == "codes":
        from datamodules.codes import CodeShardDataModule

        from tokenizers.registry import build_tokenizer

        from experiments.data_defaults import code_shards

        train, val = code_shards(cfg)  # data.code_dir's train/ and val/ parts (or data.*_shards)
        tok = build_tokenizer(**tokenizer_spec(cfg)["build"])
        # A codes-only tokenizer knows the real tokenizer only through `tokenizer.options.source`.
        expected = tok.source or None if cfg.tokenizer.kind == "codes" else tok.fingerprint
        dm = CodeShardDataModule(train, val, **common, expected_fingerprint=expected)
        made_at = dm.manifest.get("image_size")  # the samples decode at the codes' size, whatever the key says
        if made_at is not None and int(made_at) != d.image_size:
            from experiments.config import ConfigError

            raise ConfigError("data.image_size", f"{d.image_size} contradicts the codes, made at {made_at} px "
                                                 f"({dm.manifest_path}): set data.image_size={made_at}")
        return dm, dm.grid
    from datamodules.images import ImageShardDataModule
    from tokenizers.registry import build_tokenizer

    if d.kind == "embedded":
        from datamodules.embedded import embedded_shards, ensure_embedded

        manifest = ensure_embedded(d.root, verbose=False)
        train, val = embedded_shards(d.root, "train", manifest), embedded_shards(d.root, "val", manifest)
    else:
        train, val = d.train_shards, d.val_shards or None
    dm = ImageShardDataModule(train, val, image_size=d.image_size, random_flip=d.random_flip,
                              center_crop=d.center_crop, **common)
    tok = build_tokenizer(**tokenizer_spec(cfg)["build"])
    return dm, tok.grid(d.image_size, d.image_size)


def strategy_for(cfg: DictConfig):
    """The strategy object; every multi-rank one with trainer.collective_timeout_s as its process-group timeout."""
    t = cfg.trainer
    if t.strategy.startswith("deepspeed"):
        from experiments.strategies import deepspeed_strategy

        return deepspeed_strategy(cfg)
    if t.strategy in ("ddp", "ddp_spawn") or (t.strategy == "auto" and t.devices * t.num_nodes > 1):
        from lightning.pytorch.strategies import DDPStrategy

        from experiments.watchdog import process_group_timeout

        # what Lightning's "ddp" / "ddp_spawn" (and "auto" on several devices) build, plus the timeout
        return DDPStrategy(start_method="spawn" if t.strategy == "ddp_spawn" else "popen",
                           timeout=process_group_timeout(t.collective_timeout_s))
    return t.strategy


EXTRA_CALLBACKS_ENV = "ROAR_EXTRA_CALLBACKS"


def extra_callbacks() -> list:
    """``ROAR_EXTRA_CALLBACKS=module:factory[,module:factory...]``: callbacks added to every run of this process
    and of the ranks it launches (they inherit the environment), each ``factory()`` called with no arguments.
    For debugging and fault-injection tests (tests/rank_helpers.py) without a config key per experiment."""
    import importlib

    out = []
    for spec in filter(None, os.environ.get(EXTRA_CALLBACKS_ENV, "").split(",")):
        module, _, attr = spec.strip().partition(":")
        try:
            out.append(getattr(importlib.import_module(module), attr)())
        except (ImportError, AttributeError, ValueError, TypeError) as err:
            from experiments.config import ConfigError

            raise ConfigError(EXTRA_CALLBACKS_ENV, f"cannot build {spec!r} ({err})") from None
    return out


def build_callbacks(cfg: DictConfig, run_dir: str) -> list:
    c = cfg.callbacks
    # no version counter: a last.ckpt that a signal or requeue saved (experiments/signals.py, SlurmRequeue) is
    # overwritten by the resumed run's, not left stale beside a last-v1.ckpt that resume=auto would never pick;
    # FinalCheckpoint: last.ckpt also at a final step that is no multiple of ckpt_every_steps (checkpointing.py)
    callbacks = [FinalCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), filename="step{step:07d}",
                                 auto_insert_metric_name=False, every_n_train_steps=cfg.trainer.ckpt_every_steps,
                                 save_last=True, save_top_k=1, monitor=None, enable_version_counter=False)]
    if c.ema_decay > 0:  # every strategy; sharded like the parameters under ZeRO-3 (callbacks/ema.py)
        callbacks.append(EMA(c.ema_decay))
    if c.sample_every_steps:
        classes = list(c.sample_classes) or list(range(cfg.model.num_classes))
        callbacks.append(SampleGrid(c.sample_every_steps, classes, c.sample_per_class, c.sample_seed,
                                    os.path.join(run_dir, "samples")))
    if c.order_map_every_steps:  # decode-order map + reveal animation (first 4 sample classes, fixed seed)
        from lightning_modules.callbacks.order_map import OrderMap

        classes = list(c.sample_classes) or list(range(cfg.model.num_classes))
        callbacks.append(OrderMap(c.order_map_every_steps, classes[:4], c.sample_seed, os.path.join(run_dir, "order")))
    from lightning_modules.callbacks.data_stats import DataStatsCallback

    callbacks.append(DataStatsCallback())
    if cfg.eval.fid_num_samples:
        from experiments.fid_setup import fid_callback

        callbacks.append(fid_callback(cfg, run_dir))
    return callbacks + extra_callbacks()


def _not_an_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def quiet_lightning_notices() -> None:
    """Drop three Lightning notices a roar user cannot act on, printed per Trainer (four times in `make demo`): the
    srun hint outside a SLURM allocation (there, roar's sbatch scripts run srun), torch's LeafSpec deprecation raised
    inside Lightning's own code, and the litlogger advert."""
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=r".*`srun` command is available on your system but is not used")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):  # rank_zero_info's
        logging.getLogger(name).addFilter(_not_an_advert)  # the same function object each call: added once


def build_trainer(cfg: DictConfig, run_dir: str, callbacks: list, **overrides) -> L.Trainer:
    quiet_lightning_notices()  # first: SLURMEnvironment.detect() below already warns
    t = cfg.trainer
    world, micro, accumulate = batch_layout(cfg)
    strategy = strategy_for(cfg)
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from experiments.strategies import BatchLayoutCheck, SlurmRequeue
    from experiments.tb_summary import ConfigText
    from lightning_modules.callbacks.throughput import TrainThroughput

    quiet = overrides.get("enable_progress_bar") is False
    callbacks = [*callbacks, BatchLayoutCheck(t.global_batch_size, world, quiet=quiet),  # asserts the layout at start
                 # samples / tokens / model FLOPs per second and MFU in TensorBoard (callbacks/throughput.py)
                 TrainThroughput(micro, t.log_every_steps, accumulate, quiet=quiet), ConfigText(cfg)]
    plugins = [] if t.strategy.startswith("deepspeed") else [AtomicCheckpointIO()]
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if SLURMEnvironment.detect():  # SIGUSR1 requeue by our callback, not Lightning's handler (strategies.py: why)
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(SlurmRequeue(last))
    from experiments.signals import GracefulStop
    from experiments.watchdog import Watchdog, WatchdogHooks

    # the profiler slot locates every rank (hook, step) for the hang watchdog; SIGTERM / SIGINT stop at a step
    # boundary after saving last.ckpt, within trainer.stop_grace_s (experiments/{watchdog,signals}.py)
    watchdog = Watchdog(t.collective_timeout_s)
    stop = GracefulStop(last, t.stop_grace_s, watchdog)
    callbacks += [WatchdogHooks(watchdog), stop]
    from lightning_modules.callbacks.line_progress import LineProgressBar
    from lightning_modules.progress import progress_mode

    shown = progress_mode()  # off a terminal (a SLURM log) status lines, not Rich's bar (callbacks/line_progress.py)
    if shown == "lines" and not quiet:
        callbacks.append(LineProgressBar())
    elif shown == "off":
        overrides["enable_progress_bar"] = False
    kwargs = dict(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=strategy, precision=t.precision, accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.optim.grad_clip or None, val_check_interval=t.val_every_steps * accumulate,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches or None,
        log_every_n_steps=t.log_every_steps, callbacks=callbacks, deterministic=t.deterministic,
        logger=TensorBoardLogger(run_dir, name="", version="tb", default_hp_metric=False),
        fast_dev_run=t.fast_dev_run, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=plugins or None, profiler=watchdog,
        default_root_dir=run_dir, use_distributed_sampler=False,
    )
    if t.strategy.startswith("deepspeed"):
        kwargs.pop("gradient_clip_val")  # DeepSpeed clips through its own config
    kwargs.update(overrides)
    trainer = L.Trainer(**kwargs)
    stop.install(trainer)  # now, not at fit: a signal during the rank launch and set-up is handled too
    return trainer
