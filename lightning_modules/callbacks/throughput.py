"""Training throughput and MFU in TensorBoard: Lightning's ThroughputMonitor, fed with our FLOP count.

Logged by Lightning (rank 0, every ``trainer.log_every_steps``): ``train/device/samples_per_sec``,
``train/device/items_per_sec`` (items = tokens), ``train/device/flops_per_sec`` and, where a peak is defined,
``train/device/mfu``; with several ranks also the global ``train/samples_per_sec``, ``train/items_per_sec`` and
``train/flops_per_sec``; and the running totals ``train/samples``, ``train/lengths`` (tokens), ``train/time``.
Lightning does the same for validation under ``validate/`` (at validation-batch indices, its convention).

FLOPs per micro-batch are model FLOPs (lightning_modules/flops.py, the count `experiments.bench train` uses), so
the MFU here and the benchmark's agree. The peak is per device (flops.py::device_peak_flops: Lightning's spec
table on GPU, a measured matmul peak for a GPU it does not list, none on CPU, where only the rates are logged).
"""
from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.utilities import rank_zero_info


class TrainThroughput(ThroughputMonitor):
    """``ThroughputMonitor`` over our batch contract; ``micro_batch`` samples per training batch and rank.

    The rolling window is one logging interval (``log_every_steps`` optimizer steps of ``accumulate`` micro-batches,
    +1 for the differences), so each logged rate is that of the interval since the previous point."""

    def __init__(self, micro_batch: int, log_every_steps: int = 1, accumulate: int = 1, quiet: bool = False):
        super().__init__(batch_size_fn=self.samples_in, length_fn=self.tokens_in,
                         window_size=max(2, log_every_steps * accumulate + 1))
        self.micro_batch, self.quiet = micro_batch, quiet
        self.tokens_per_sample = 1
        self.train_flops = 0
        self.peak_source = ""

    # bound methods, not lambdas: ddp_spawn pickles the callbacks
    def samples_in(self, batch) -> int:
        return int(batch["label"].shape[0])

    def tokens_in(self, batch) -> int:
        return self.samples_in(batch) * self.tokens_per_sample

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lightning_modules.flops import batch_train_flops, device_peak_flops

        with warnings.catch_warnings():  # Lightning's "FLOPs not found for <GPU>": device_peak_flops measures it
            warnings.simplefilter("ignore")
            super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.tokens_per_sample = pl_module.num_positions
        # ThroughputMonitor reads this attribute of the module on every batch (its documented interface); counted
        # here, before the strategy wraps or shards the weights
        self.train_flops = pl_module.flops_per_batch = batch_train_flops(pl_module, self.micro_batch)
        device = trainer.strategy.root_device
        peak, self.peak_source = device_peak_flops(device, _plugin_to_compute_dtype(trainer.precision_plugin))
        self.available_flops = peak
        for throughput in self._throughputs.values():  # built by super().setup with Lightning's table value
            throughput.available_flops = peak
        if not self.quiet:
            rank_zero_info(f"roar: throughput: {pl_module.flops_per_batch / 1e9:.3f} model GFLOP per micro-batch of "
                           f"{self.micro_batch}; MFU peak: "
                           + (f"{peak / 1e12:.1f} TFLOP/s ({self.peak_source})" if peak else self.peak_source))

    # validation runs forward only: a third of the training step's model FLOPs per batch (flops.py: 3 x forward)
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.train_flops:
            pl_module.flops_per_batch = self.train_flops // 3
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.train_flops:
            pl_module.flops_per_batch = self.train_flops
