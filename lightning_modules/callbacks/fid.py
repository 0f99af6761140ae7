"""FIDCallback: online FID / IS from a fixed, class-balanced sample set, spread across ranks.

The sample set is a pure function of (num_samples, num_classes, batch_size, seed): sample i has label
``i % num_classes``; batch b (samples [b*B, (b+1)*B)) is drawn with ``batch_seed(seed, b)``. Rank r draws batches
r, r + W, r + 2W, ... so the union over ranks is the same set for any W, and every variant (RAR, RandAR, ARPG,
raster) is scored on identical labels and seeds; only the ordering differs. ``batch_size`` is therefore part of
the protocol (it is global, not per rank).

Features and logits go into a ``FeatureStats`` metric whose sum-reduced states torchmetrics syncs across ranks;
FID/IS come from the same numerics as ``python -m experiments.evaluate``. The EMA weights are used when an EMA
callback is attached. Ranks sample through ``callbacks/gathered.py::sampling_module``: whole weights on every
rank, so no forward is a collective (under ZeRO-3 a gathered replica) and a rank with one batch fewer than its
peers (num_batches not a multiple of W) cannot hang them; the collectives are the metric sync and the max of the
sampling times, which every rank reaches. Logs ``val/fid{n}`` and ``val/is{n}`` with
n = 1k / 10k / 50k, or the plain count when not a multiple of 1000 (``val/fid200``), and the sampling throughput
``val/sample_images_per_s`` (the set's images over the slowest rank's time in ``sample_images``).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.callbacks.gathered import sampling_module
from lightning_modules.metrics.extractors import load_extractor
from lightning_modules.metrics.reference import RefStats, resolve_reference
from lightning_modules.metrics.scores import FeatureStats, fid_from_stats
from lightning_modules.progress import Progress
from lightning_modules.sample_set import batch_seed, count_tag, eval_plan


# The sample-set protocol (labels, seeds, batches) is lightning_modules/sample_set.py, shared with experiments.sample
# so that an offline .npz of a checkpoint scores the val/fid it logged; re-exported here for callers of this module.
__all__ = ["FIDCallback", "batch_seed", "count_tag", "eval_plan"]


class FIDCallback(Callback):
    """Every ``every_n_steps`` optimizer steps (0 = never) and/or at fit end: sample, extract, log FID / IS.

    ``ref``: an .npz, ``digits[:split]`` or shard pattern (see ``metrics.reference.resolve_reference``; extra
    arguments such as image_size/count/cache_dir go in ``ref_kwargs``), or a callable ``ref(extractor)`` returning
    ``RefStats`` or ``(mu, sigma)``. ``sample_kwargs`` are passed to ``pl_module.sample_images`` unchanged.
    """

    def __init__(self, every_n_steps: int = 0, num_samples: int = 1000, num_classes: int = 1000,
                 extractor_kind: str = "inception", extractor_path: str | None = "",
                 ref: str | Callable[[Any], RefStats | tuple] = "", seed: int = 0, batch_size: int = 50,
                 sample_kwargs: dict | None = None, at_fit_end: bool = True, ref_kwargs: dict | None = None):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"FIDCallback: every_n_steps must be >= 0, got {every_n_steps}")
        eval_plan(num_samples, num_classes, batch_size, seed)  # validates the counts early
        self.every_n_steps, self.num_samples, self.num_classes = every_n_steps, num_samples, num_classes
        self.extractor_kind, self.extractor_path, self.ref = extractor_kind, extractor_path, ref
        self.seed, self.batch_size, self.at_fit_end = seed, batch_size, at_fit_end
        self.sample_kwargs = dict(sample_kwargs or {})
        self.ref_kwargs = dict(ref_kwargs or {})
        self.tag = count_tag(num_samples)
        self.extractor = None
        self.ref_stats: RefStats | None = None
        self.last_results: dict = {}  # merged into metrics.json by experiments.train
        self._last_step = -1

    # -- setup: load the extractor and the reference before training, so a bad path fails in seconds ----------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # rank 0 reports the reference's feature extraction where the trainer shows progress
            self._prepare(show_progress=trainer.is_global_zero and trainer.progress_bar_callback is not None)

    def _prepare(self, show_progress: bool = False) -> None:
        if self.extractor is None:
            self.extractor = load_extractor(self.extractor_kind, self.extractor_path)
        if self.ref_stats is None:
            if callable(self.ref):
                out = self.ref(self.extractor)
                ref = out if isinstance(out, RefStats) else RefStats(out[0], out[1], 0, "", "callable")
                ref.mu, ref.sigma = np.asarray(ref.mu, np.float64), np.asarray(ref.sigma, np.float64)
                self.ref_stats = ref.check(self.extractor)
            else:
                from lightning_modules.metrics.shard_extractor import check_domain

                # the digits CNN on photos, or a shard CNN of another dataset / resolution: one line, before training
                check_domain(self.extractor, self.ref_kwargs.get("image_size"), str(self.ref))
                self.ref_stats = resolve_reference(str(self.ref), self.extractor, need_features=False,
                                                   show_progress=show_progress, **self.ref_kwargs)

    # -- triggers ------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # global_step repeats across micro-batches under gradient accumulation: evaluate once per step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # -- the evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """Sample this rank's share, sync moments across ranks, log on every rank's callback_metrics."""
        self._prepare()
        t0 = time.time()
        device = pl_module.device
        extractor = self.extractor.to(device)
        metric = FeatureStats(extractor.num_features, extractor.num_classes, total=self.num_samples).to(device)
        plan = list(eval_plan(self.num_samples, self.num_classes, self.batch_size, self.seed,
                              trainer.global_rank, trainer.world_size))
        # rank 0's share, and only where the trainer shows progress (not in quiet runs: tests, sweeps)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        progress = Progress(sum(len(labels) for _, labels, _, _ in plan),
                            f"[fid] step {trainer.global_step}: sampling (rank 0's share)", "images", enabled=show)
        sampling_s = 0.0
        # class-consistency (lightning_modules/metrics/consistency.py) where the extractor classifies these labels
        scores_labels = extractor.scores_labels and extractor.num_classes == self.num_classes
        matches = torch.zeros((), dtype=torch.float64, device=device)
        with sampling_module(trainer, pl_module, ranks="all") as (module, used_ema), progress:
            was_training = module.training
            try:
                module.eval()
                for _, labels, index, seed in plan:
                    # one profiled action per batch: the hang watchdog (experiments/watchdog.py) sees progress
                    with trainer.profiler.profile("[FIDCallback]sample_batch"):
                        start = time.perf_counter()
                        images = module.sample_images(labels.to(device), seed=seed, **self.sample_kwargs)
                        sampling_s += time.perf_counter() - start  # decoded to uint8: the work is done
                    if images.shape[0] != len(labels):
                        raise ValueError(f"sample_images returned {images.shape[0]} images for {len(labels)} labels")
                    feats, logits = extractor.features_and_logits(images)   # [b, F], [b, K]
                    metric.update(feats, logits, index.to(device))
                    if scores_labels:
                        matches += (logits.argmax(-1) == labels.to(device)).sum()
                    progress.update(len(labels))
            finally:
                module.train(was_training)
        out = metric.compute()  # collective: every rank must reach this line
        # the set's images over the slowest rank's sampling time (a second collective that every rank reaches)
        slowest = float(trainer.strategy.reduce(torch.tensor(sampling_s, device=device), reduce_op="max"))
        ref = self.ref_stats
        fid = fid_from_stats(out["mu"], out["sigma"], ref.mu, ref.sigma)
        metrics = {f"val/fid{self.tag}": fid, f"val/is{self.tag}": out.get("is", float("nan")),
                   "val/sample_images_per_s": out["num_samples"] / max(slowest, 1e-9)}
        if scores_labels:  # every rank takes this branch (same extractor), so every rank reaches the collective
            total = float(trainer.strategy.reduce(matches, reduce_op="sum"))
            metrics[f"val/class_consistency{self.tag}"] = total / max(out["num_samples"], 1)
        self._last_step = trainer.global_step
        # the details sit under one key so merging into metrics.json cannot clobber the run's own fields
        self.last_results = dict(metrics, fid_eval={
            "step": trainer.global_step, "num_samples": out["num_samples"], "ema": used_ema,
            "extractor": extractor.name, "reference": ref.source, "seed": self.seed, "batch_size": self.batch_size,
            "sample_kwargs": self.sample_kwargs})
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"[fid] step {trainer.global_step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                       + f" ({out['num_samples']} samples, ema={used_ema}, {time.time() - t0:.1f}s)")
        return metrics

    # -- checkpointed state: the last values survive a resume (metrics.json reads them) ----------------------------
    def state_dict(self) -> dict:
        return {"last_results": self.last_results, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_results = dict(state_dict.get("last_results", {}))
        self._last_step = int(state_dict.get("last_step", -1))
