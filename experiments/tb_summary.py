"""What a run leaves in TensorBoard for comparing runs: its resolved config as hparams with its final metrics
(the HParams tab sorts and filters a sweep by them), and the config YAML as text.

``tensorboard --logdir runs/`` (or a sweep's out_dir) then lists every run in the HParams tab: one column per
config leaf (dotted keys, ``model.variant``, ``optim.lr``, ...; lists and dicts as JSON strings) and one per final
metric: ``val/nll`` (and its order quarters), ``val/fid{n}`` / ``val/is{n}`` and ``val/sample_images_per_s`` when
FID ran, any other ``val/*`` value (class-consistency when a callback logs it), ``train/loss`` and
``train/tokens_seen``. The plugin reads a metric's value from the last scalar of that tag in the run, so every
metric is also logged as a scalar, at the final step (after every other point of its curve: nothing is purged).

Written once, by rank 0, at the end of ``experiments.train.run`` through Lightning's
``TensorBoardLogger.log_hyperparams(params, metrics, step)``. The plugin takes the metric *definitions* of the
first run it finds, which is right for a sweep (its runs share the eval settings, so the same metric tags).
"""
from __future__ import annotations

import json
import math

from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf


def flat_config(cfg: DictConfig) -> dict:
    """Every config leaf (experiments/readers.py::config_leaves) under its dotted key: bool / int / float / str,
    anything else (lists, ``tokenizer.options``) as its JSON text."""
    from experiments.readers import config_leaves

    out = {}
    for key in config_leaves(cfg):
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def final_metrics(result: dict) -> dict:
    """The finite scalar results of a run (experiments.train.run's dict) under their TensorBoard tags."""
    candidates = {k: v for k, v in result.get("metrics", {}).items() if k.startswith("val/") or k == "train/loss"}
    candidates.update({k: v for k, v in result.items() if k.startswith("val/")})  # FIDCallback.last_results
    candidates["train/tokens_seen"] = result.get("tokens_seen")
    return {k: float(v) for k, v in sorted(candidates.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_run_summary(logger, cfg: DictConfig, result: dict, step: int, extra: dict | None = None) -> dict:
    """hparams (config leaves + ``extra``) with the final metrics, at ``step``; returns the metrics logged.
    Call on rank 0 after fit (the logger has closed its writer then: it reopens one and is closed again here)."""
    metrics = final_metrics(result)
    logger.log_hyperparams({**flat_config(cfg), **(extra or {})}, metrics, step=step)
    logger.finalize("success")  # flush and close the event file opened for these summaries
    return metrics


def config_markdown(cfg: DictConfig) -> str:
    # indented = a Markdown code block, which TensorBoard's text plugin shows verbatim
    return "\n".join("    " + line for line in OmegaConf.to_yaml(cfg).splitlines())


class ConfigText(Callback):
    """The resolved config YAML as TensorBoard text (``config``), by rank 0 when training starts (a resumed run
    writes it again at the step it resumed from)."""

    def __init__(self, cfg: DictConfig):
        self.text = config_markdown(cfg)

    def on_train_start(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if trainer.is_global_zero and logger is not None and hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text("config", self.text, global_step=trainer.global_step)
