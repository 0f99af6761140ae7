"""Scale-out pieces the trainer builder plugs in: DeepSpeed ZeRO-2 / 3 / 3+offload from the experiment config,
a CPU-capable DeepSpeed strategy (for tests and CPU clusters), a run-time check of the world and batch layout,
and SLURM's SIGUSR1 -> checkpoint -> requeue (SlurmRequeue).

    trainer.strategy=deepspeed_stage_2            ZeRO-2: optimizer state + gradients sharded
    trainer.strategy=deepspeed_stage_3            ZeRO-3: parameters sharded too (EMA sharded alike, callbacks/ema.py)
    trainer.strategy=deepspeed_stage_3_offload    ZeRO-3 + optimizer state in CPU memory (DeepSpeedCPUAdam)

Everything DeepSpeed needs is derived here, from the same keys DDP uses: micro batch (batch_layout), gradient
clipping (optim.grad_clip), bf16 (trainer.precision). Lightning fills in gradient_accumulation_steps itself.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess

import lightning as L
import torch
from omegaconf import DictConfig

from experiments.config import batch_layout

ZERO = {  # trainer.strategy -> (ZeRO stage, optimizer offload to CPU)
    "deepspeed_stage_2": (2, False),
    "deepspeed_stage_3": (3, False),
    "deepspeed_stage_3_offload": (3, True),
}


def on_gpu(cfg: DictConfig) -> bool:
    a = cfg.trainer.accelerator
    return a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: DictConfig) -> dict:
    """The DeepSpeed config dict for trainer.strategy (one of ZERO)."""
    t, o = cfg.trainer, cfg.optim
    if t.strategy not in ZERO:
        raise ValueError(f"trainer.strategy: {t.strategy!r} is not a DeepSpeed strategy (one of {sorted(ZERO)})")
    stage, offload = ZERO[t.strategy]
    _, micro, _ = batch_layout(cfg)
    zero = {"stage": stage, "contiguous_gradients": True, "overlap_comm": on_gpu(cfg)}
    config = {
        # the per-rank batch DeepSpeed asserts against (micro x accumulation x world = its train_batch_size)
        "train_micro_batch_size_per_gpu": micro,
        "gradient_clipping": float(o.grad_clip),  # Lightning's gradient_clip_val is not used under DeepSpeed
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our client AdamW (two param groups) is fine for ZeRO
        "bf16": {"enabled": t.precision.startswith("bf16")},
    }
    if offload:
        # The optimizer is still ours (ARModule.configure_optimizers: the same two parameter groups and LR schedule
        # as every other strategy), as DeepSpeedCPUAdam: ZeRO-Offload refuses a torch optimizer (ENVIRONMENT.md §3)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu(cfg)}
    return config


def deepspeed_strategy(cfg: DictConfig):
    """Lightning's stock DeepSpeedStrategy on GPU; CPUDeepSpeedStrategy when training on CPU."""
    if cfg.trainer.precision.startswith("16") and not on_gpu(cfg):
        raise ValueError(f"trainer.precision: {cfg.trainer.precision} (fp16) needs a GPU under DeepSpeed; "
                         f"use bf16-mixed or 32-true on CPU")
    from experiments.watchdog import process_group_timeout

    config = deepspeed_config(cfg)
    timeout = process_group_timeout(cfg.trainer.collective_timeout_s)  # deepspeed.init_distributed(timeout=...)
    if on_gpu(cfg):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=config, timeout=timeout)
    # without this DeepSpeed would pick CUDA on a GPU machine told to train on CPU; child ranks inherit it
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return cpu_strategy_class()(config=config, timeout=timeout)


def cpu_strategy_class():
    """Built lazily: importing Lightning's DeepSpeed strategy needs deepspeed installed (an optional extra)."""
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Lightning's DeepSpeedStrategy minus its CUDA assumptions: the three overrides of ENVIRONMENT.md §3 for
        fit, and a fourth for the inference engine of validate/test; DeepSpeed then runs on gloo."""

        def setup_environment(self) -> None:
            # the stock method raises "only supported on CUDA GPUs" before doing DDP's setup
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            # the stock method validates device indices, which are [None] on CPU; the rest is unchanged
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            # the stock method passes root_device.index (None on CPU) as device_rank; DeepSpeed compares it to 0
            import deepspeed

            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
                model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
                optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
            return engine, ds_optimizer

        def _initialize_deepspeed_inference(self, model) -> None:
            # trainer.validate() after fit (train.py's final val NLL) builds an inference engine: the stock
            # method has the same root_device.index problem. Same config as the stock one: precision and, for
            # ZeRO-3, the partitioning; no optimizer.
            import deepspeed
            from lightning.pytorch.strategies.deepspeed import remove_module_hooks

            keys = ["fp16", "bf16"] + (["zero_allow_untested_optimizer", "zero_optimization"]
                                       if self.zero_stage_3 else [])
            config = {"train_micro_batch_size_per_gpu": 1, **{k: self.config[k] for k in keys if k in self.config}}
            remove_module_hooks(model)
            self.model, *_ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=config, model=model,
                model_parameters=[], optimizer=None, lr_scheduler=None, dist_init_required=False)

    return CPUDeepSpeedStrategy


class BatchLayoutCheck(L.Callback):
    """Asserts at run time what experiments.config.batch_layout promised: the launcher started the world the
    config asked for, and per-device batch x world x accumulation == trainer.global_batch_size.

    A SLURM job whose --ntasks-per-node differs from trainer.devices otherwise trains silently on a smaller
    world (Lightning issue #20391), i.e. with a smaller global batch than the run name and config claim.
    """

    def __init__(self, global_batch: int, world: int, quiet: bool = False):
        self.global_batch, self.world, self.quiet = global_batch, world, quiet
        self.micro: int | None = None
        self.checked_batch = False
        self.start_step: int | None = None  # global step when this process started training (resumes included)

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size != self.world:
            raise RuntimeError(f"trainer.devices x trainer.num_nodes = {self.world} but {trainer.world_size} "
                               f"process(es) were started (SLURM: --ntasks-per-node must equal trainer.devices)")
        self.micro = getattr(trainer.datamodule, "batch_size", None)
        if self.micro is None:
            raise RuntimeError("data: the DataModule has no batch_size attribute to check the batch layout with")
        accumulate = trainer.accumulate_grad_batches
        if self.micro * trainer.world_size * accumulate != self.global_batch:
            raise RuntimeError(f"trainer.global_batch_size: {self.global_batch} != per-device batch {self.micro} x "
                               f"world {trainer.world_size} x accumulation {accumulate}")
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.checked_batch or not isinstance(batch, dict) or "label" not in batch:
            return
        got = int(batch["label"].shape[0])
        if got != self.micro:
            raise RuntimeError(f"data: rank {trainer.global_rank} got a batch of {got}, expected the per-device "
                               f"batch {self.micro} (trainer.global_batch_size / world / accumulation)")
        self.checked_batch = True  # the first batch is enough: the loaders emit whole batches only

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start_step is None or trainer.global_step <= self.start_step:
            return
        self.start_step = None  # announce once
        # printed after the first optimizer step, which every rank has joined (gradient all-reduce): from here
        # on all ranks are in the training loop with their signal handlers (SLURM requeue) installed
        if trainer.is_global_zero and not self.quiet:
            print(f"roar: batch layout ok: global {self.global_batch} = {self.micro} per device x "
                  f"{trainer.world_size} rank(s) x {trainer.accumulate_grad_batches} accumulation "
                  f"(step {trainer.global_step})", flush=True)


class SlurmRequeue(L.Callback):
    """SIGUSR1 (sbatch --signal=SIGUSR1@90, or scancel --signal=USR1) -> checkpoint -> `scontrol requeue`, safely.

    Lightning's own auto-requeue (SLURMEnvironment(auto_requeue=True)) checkpoints from INSIDE the signal handler.
    A rank that takes the signal while its peer is inside a gradient all-reduce enters the checkpoint barrier
    alone and the job deadlocks (1 of 6 runs of tests/test_scale_slurm.py with 2 CPU ranks). Its hpc_ckpt_<n>.ckpt
    is also invisible to resume=auto, and Lightning reloads it for every later validate(ckpt_path=None).
    Here the handler only sets a flag; after each optimizer step the ranks agree on it (one all-reduce, as
    Lightning does for SIGTERM), all save ``ckpt_path`` (checkpoints/last.ckpt, which resume=auto finds)
    together, and rank 0 requeues the job. Training goes on until the requeue's SIGTERM ends the process.
    """

    def __init__(self, ckpt_path: str, signum: int = signal.SIGUSR1):
        self.ckpt_path, self.signum = ckpt_path, signum
        self.flagged, self.done, self.last_step = False, False, -1
        self.previous = None

    def _handler(self, signum, frame) -> None:
        self.flagged = True  # nothing else in a handler: the main thread may be inside a collective

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # before the first step: an unhandled SIGUSR1 would kill the process
            self.previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.done or trainer.global_step == self.last_step:  # once per optimizer step, the same on every rank
            return
        self.last_step = trainer.global_step
        flag = torch.tensor(float(self.flagged), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() < 1:
            return
        self.done = True
        trainer.save_checkpoint(self.ckpt_path)  # every rank: a barrier under DDP, a collective under DeepSpeed
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            outcome = (f"requeued SLURM job {job}" if done.returncode == 0 else
                       f"scontrol requeue {job} failed: {done.stderr.strip()} (training goes on)")
            print(f"roar: requeue signal: saved {self.ckpt_path} at step {trainer.global_step}; {outcome}",
                  flush=True)
