"""Train a generator: one ordering (model.variant) over the shared backbone.

    # the embedded default (digits, CPU):
    python -m experiments.train -c experiments/configs/demo/raster.yaml
    # any ordering is one key:
    python -m experiments.train -c experiments/configs/demo/raster.yaml model.variant=randar
    # one GPU, ImageNet codes:     python -m experiments.train -c experiments/configs/randar_L.yaml
    # one node, 8 GPUs:            ... trainer.devices=8 trainer.strategy=ddp
    # N nodes under SLURM:         sbatch --nodes=N experiments/slurm/train.sbatch -c ... (see README)

Writes runs/<name>/{config.yaml, tb/ (TensorBoard), checkpoints/last.ckpt, samples/, metrics.json}.
resume=auto (default) continues from runs/<name>/checkpoints/last.ckpt when it exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from omegaconf import OmegaConf

from experiments.cli import config_parser, fail, parse_config
from experiments.config import ConfigError, batch_layout, config_hash, operational_twin, run_name


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.backbone.parameters())


def launch_rank() -> int:
    """This process's global rank as its launcher set it (Lightning reads the same variables; the trainer's own
    ``global_rank`` is 0 in every process until fit sets the ranks up)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def write_json_atomic(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def ended_ranks(trainer, cfg, err: BaseException) -> BaseException:
    """After fit / validate raised: no rank outlives this process (the launcher waits for the ranks it started,
    then kills them), and a collective failure becomes one line naming the rank and where (experiments/watchdog.py)."""
    from experiments.signals import GracefulStop
    from experiments.watchdog import CollectiveFailure, Watchdog, is_collective_failure, reap_launched

    for stop in (c for c in trainer.callbacks if isinstance(c, GracefulStop)):
        stop.hold_if_ending()  # a signal's deadline is ending every rank: its line and exit status stand
    watchdog = trainer.profiler if isinstance(trainer.profiler, Watchdog) else None
    if watchdog is not None:
        if watchdog.exiting:  # likewise the hang monitor's (it exits the process from its thread)
            time.sleep(30)
        watchdog.disarm()  # the wait below is bounded on its own
    reap_launched(trainer, cfg.trainer.stop_grace_s)
    if watchdog is not None and is_collective_failure(err):
        return CollectiveFailure(watchdog.describe_failure(err) if watchdog.claim_line() else "")
    return err


def finished_run(cfg, run_dir: str) -> dict | None:
    """metrics.json of a finished run of exactly this config (same config hash, its steps and last.ckpt's both at
    trainer.max_steps), else None. Also ablate's and the study's test for a finished arm."""
    from lightning_modules.checkpointing import checkpoint_step

    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):  # missing or unreadable: train (resume) as if it were not there
        return None
    steps = cfg.trainer.max_steps
    if record.get("config_hash") != config_hash(cfg) or record.get("steps") != steps:
        return None
    # a run made before last.ckpt was saved at the final step (its last save a multiple of ckpt_every_steps)
    # resumes to write it
    if checkpoint_step(os.path.join(run_dir, "checkpoints", "last.ckpt")) != steps:
        return None
    return record


def finished_record(cfg, run_dir: str) -> dict | None:
    """finished_run's record (with run_dir) when re-running this run would do nothing (resume=auto, not a
    fast_dev_run), else None. Fitting from a finished last.ckpt trains nothing, but would still validate, sample
    and log the final step a second time and overwrite fit_seconds with the no-op's seconds."""
    if cfg.resume != "auto" or cfg.trainer.fast_dev_run:
        return None
    record = finished_run(cfg, run_dir)
    return None if record is None else dict(record, run_dir=run_dir)


def run(cfg, quiet: bool = False) -> dict:
    """Train per ``cfg``; returns the metrics dict written to runs/<name>/metrics.json (a finished run's recorded
    one, without training: see finished_record)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from experiments.build import build_callbacks, build_datamodule, build_lightning_module, build_trainer
    from experiments.tb_summary import log_run_summary
    from lightning_modules.checkpointing import find_resume_checkpoint
    from lightning_modules.tf32 import cuda_tf32

    name = run_name(cfg)
    run_dir = os.path.join(cfg.out_dir, name)
    record = finished_record(cfg, run_dir)
    if record is not None:
        if not quiet and launch_rank() == 0:
            print(f"roar: {name}: finished at step {record['steps']} ({run_dir}/metrics.json): nothing to train "
                  f"(resume=never trains it again)", flush=True)
        return record
    if cfg.resume == "auto" and not cfg.name and not os.path.isdir(run_dir) and launch_rank() == 0:
        twin = operational_twin(cfg)  # the same run but for how often it checkpoints or logs: not resumed silently
        if twin is not None:
            print(f"roar: {name}: a new run; {cfg.out_dir}/{twin[0]} is this run with {', '.join(twin[1])}: add "
                  f"name={twin[0]} to continue that one", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    world, micro, accumulate = batch_layout(cfg)
    dm, grid = build_datamodule(cfg, micro)
    module = build_lightning_module(cfg, grid)
    try:  # sample settings the ordering cannot decode with fail now, not at the first sample grid
        module.checked_sample_settings()
    except ValueError as err:
        key, _, message = str(err).partition(": ")
        raise ConfigError(key, message) from None
    if cfg.init_from:
        from experiments.checkpoints import load_weights_into

        load_weights_into(module, cfg.init_from)
    n_params = count_parameters(module)
    if not quiet and launch_rank() == 0:  # every rank runs this file; before fit only the environment knows which
        print(f"roar: {name}: {cfg.model.variant} on {cfg.model.flavour}/{cfg.model.size}, "
              f"{n_params / 1e6:.3f}M parameters, global batch {cfg.trainer.global_batch_size} = "
              f"{world} device(s) x {micro} x {accumulate} accumulation")
    from experiments.data_defaults import no_val_reason

    no_val = no_val_reason(cfg)
    if no_val and all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "RANK", "SLURM_PROCID")):
        print(f"roar: {name}: {no_val}", flush=True)  # once, instead of Lightning's warning per validation
    callbacks = build_callbacks(cfg, run_dir)
    extra = {"limit_val_batches": 0} if no_val else {}  # Lightning then skips validation without a warning
    trainer = build_trainer(cfg, run_dir, callbacks, enable_progress_bar=not quiet, **extra)
    ckpt = find_resume_checkpoint(cfg.resume, run_dir)
    start = time.time()
    try:
        with cuda_tf32(cfg.trainer.tf32):  # before fit's setup: Lightning's ThroughputMonitor picks its peak by it
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            if module.last_val_step != trainer.global_step and not cfg.trainer.fast_dev_run and not no_val:
                # metrics.json always holds the final val NLL; validate() replaces callback_metrics, so merge
                trainer.validate(module, datamodule=dm, verbose=False)
                metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    except BaseException as err:
        failure = ended_ranks(trainer, cfg, err)
        if failure is err:
            raise
        raise failure from None  # the one-line CollectiveFailure stands for the gloo / NCCL error
    stats = next((c for c in callbacks if hasattr(c, "final_skipped")), None)
    fid = next((c for c in callbacks if hasattr(c, "last_results")), None)
    result = {
        "run": name, "variant": cfg.model.variant, "flavour": cfg.model.flavour, "size": cfg.model.size,
        "seed": cfg.seed, "config_hash": config_hash(cfg), "git_sha": git_sha(), "params": n_params,
        "steps": trainer.global_step,
        "tokens_seen": trainer.global_step * cfg.trainer.global_batch_size * module.num_positions,
        "fit_seconds": round(time.time() - start, 2), "resumed_from": ckpt or "",
        "train_loss": metrics.get("train/loss"), "val_nll_bits": metrics.get("val/nll"),
        **({"val_nll_note": no_val} if no_val else {}),
        "data_skipped": getattr(stats, "final_skipped", None), "images_seen": getattr(stats, "final_images_seen", None),
        "nonfinite_skipped": module.nonfinite_total,
        "metrics": metrics, "run_dir": run_dir,
    }
    if fid is not None:
        result.update(getattr(fid, "last_results", {}) or {})
    if trainer.global_rank == 0:
        write_json_atomic(os.path.join(run_dir, "metrics.json"), result)
        if isinstance(trainer.logger, TensorBoardLogger):  # the HParams tab: config + final metrics (tb_summary.py)
            log_run_summary(trainer.logger, cfg, result, trainer.global_step, {"params": n_params})
        if not quiet:
            print(f"roar: {name}: val NLL {result['val_nll_bits']} bits/token after {result['steps']} steps")
            parts = {"config.yaml": "config.yaml", "tb": "tb/ TensorBoard logs", "checkpoints": "checkpoints/",
                     "samples": "samples/", "metrics.json": "metrics.json"}  # those this run has (samples may be off)
            wrote = [text for entry, text in parts.items() if os.path.exists(os.path.join(run_dir, entry))]
            print(f"roar: wrote {run_dir}/ ({', '.join(wrote)})")
    from experiments.watchdog import reap_launched

    reap_launched(trainer, cfg.trainer.stop_grace_s)  # the launcher exits after the ranks it started, not before
    return result


def main(argv=None) -> int:
    parser = config_parser(__doc__.splitlines()[1], epilog=__doc__)
    args = parser.parse_args(argv)
    cfg = parse_config(args)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    from experiments.signals import RunStopped, stop_status
    from experiments.watchdog import CollectiveFailure
    from lightning_modules.base import NonFiniteLossError
    from lightning_modules.checkpointing import CheckpointError
    from tokenizers.base import TokenizerMismatchError

    try:
        run(cfg)
    except ConfigError as err:  # bad input found while building (sample settings, ROAR_EXTRA_CALLBACKS)
        fail(f"config {err}")
    except RunStopped as stop:  # SIGTERM / SIGINT: saved and stopped at a step boundary (experiments/signals.py)
        return stop_status(stop)
    except (FileNotFoundError, TokenizerMismatchError, CheckpointError) as err:
        fail(str(err).splitlines()[0], 2)  # bad input (a file, a checkpoint): one line naming it, no traceback
    except CollectiveFailure as err:  # one line for the run; "" when another rank wrote it (watchdog.claim_line)
        if str(err):
            fail(str(err), 1, alone=True)
        return 1
    except NonFiniteLossError as err:
        fail(str(err).splitlines()[0], 1, alone=True)  # the run failed: one line naming the cause, no traceback
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
