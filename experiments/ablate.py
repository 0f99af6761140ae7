"""Ablation sweeps: train every arm with equal compute, evaluate each under several decode settings, collect tables.

    python -m experiments.ablate -c experiments/configs/sweeps/demo.yaml                 # train locally, then collect
    python -m experiments.ablate -c SWEEP.yaml --executor slurm --launch-arg=--partition=P  # submit unfinished arms
    python -m experiments.ablate -c SWEEP.yaml --collect-only                            # never train; tables only
    python -m experiments.ablate -c SWEEP.yaml eval.fid_samples=1000 axes.seeds=[0,1,2]  # sweep-file overrides

A sweep YAML names a base preset, the axes and overrides (``SweepConfig`` below). Training arms are
variants x sizes x seeds; decode steps x CFG scales x schedules are *evaluation* arms applied to every trained arm
(no retraining). Every arm gets the same global batch and steps, so the same tokens (asserted; ``tokens_seen`` is
a table column). A run counts as finished when its metrics.json has steps == max_steps and the arm's config hash,
so re-running collects it instead of retraining; evaluation results are cached in
``<run>/ablation_eval.json`` under a key of every knob. An evaluation setting an ordering cannot run (raster/RAR
decode one token per step, so only N steps; ``locality`` needs RandAR/ARPG) is skipped and listed.
Writes ``<out_dir>/ablation.{md,csv,json}``, ``plots/*.png`` and TensorBoard images in ``<out_dir>/ablation/``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments.config import ConfigError, SampleConfig, config_hash, load_config
from experiments.signals import ends_in_one_line
from lightning_modules.metrics.extractors import DEFAULT_DIGITS_WEIGHTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_CACHE = "ablation_eval.json"


@dataclass
class SweepAxes:
    # orderings and scans on one axis: "raster", "randar", "scan@spiral_in" (the scan ordering over a scan),
    # "rar@zcurve" (RAR annealing towards z-curve); [] = every registered ordering (lightning_modules/variants.py)
    variants: list = field(default_factory=list)
    sizes: list = field(default_factory=list)  # [] = the base preset's model.size
    seeds: list = field(default_factory=lambda: [0])
    decode_steps: list = field(default_factory=lambda: [0])  # 0 = the ordering's default
    cfg_scales: list = field(default_factory=lambda: [1.0])
    schedules: list = field(default_factory=lambda: [""])  # "" = the ordering's default; e.g. "locality"


@dataclass
class SweepEval:
    fid_samples: int = 200  # class-balanced samples per evaluation arm; 0 = no FID (images/s only)
    batch_size: int = 100  # part of the sample-set protocol (labels and seeds per batch, as the FID callback)
    seed: int = 0
    extractor: str = "digits"  # digits | inception
    extractor_weights: str = DEFAULT_DIGITS_WEIGHTS  # digits: trained (seconds) when missing
    reference: str = "digits"  # see lightning_modules.metrics.reference.resolve_reference
    ips_samples: int = 0  # without FID: images sampled to time images/s (0 = batch_size)
    device: str = ""  # "" = cuda when available, else cpu
    sample: list = field(default_factory=list)  # extra "sample.key=value" for every evaluation arm


@dataclass
class SweepConfig:
    name: str = ""
    base: str = ""  # preset path: relative to the working directory, the repo root or this sweep file
    out_dir: str = ""  # "" = runs/ablations/<name>
    run_name: str = "{variant}-{size}-s{seed}-{hash}"  # fields: variant size seed hash
    axes: SweepAxes = field(default_factory=SweepAxes)
    overrides: list = field(default_factory=list)  # dotlist applied to every training arm
    # ordering name (model.variant) -> dotlist for its arms only: an ordering's own options, which the shared base
    # preset cannot set (nothing else reads them), e.g. {rar: [model.rar_anneal_start=0.0, ...]}
    arm_overrides: dict = field(default_factory=dict)
    eval: SweepEval = field(default_factory=SweepEval)


@dataclass
class Arm:
    """One training arm: a full experiment config and where its run lives."""

    variant: str
    size: str
    seed: int
    cfg: DictConfig
    name: str
    run_dir: str
    metrics: dict | None = None  # metrics.json once finished


# ---------------------------------------------------------------------------------------------------- the sweep
def _resolve_path(path: str, sweep_file: str) -> str:
    for candidate in (path, os.path.join(REPO, path), os.path.join(os.path.dirname(sweep_file), path)):
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError("base", f"preset not found: {path}")


def load_sweep(path: str, overrides: list[str] = ()) -> DictConfig:
    """Sweep YAML over ``SweepConfig`` defaults, then dotlist overrides. Raises ConfigError naming the key."""
    sweep = OmegaConf.structured(SweepConfig)
    try:
        sweep = OmegaConf.merge(sweep, OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except FileNotFoundError:
        raise ConfigError("-c", f"sweep file not found: {path}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(getattr(err, "full_key", None) or "sweep", str(err).splitlines()[0]) from None
    if not sweep.base:
        raise ConfigError("base", f"{path}: the sweep needs a base preset")
    sweep.base = _resolve_path(sweep.base, path)
    sweep.name = sweep.name or os.path.splitext(os.path.basename(path))[0]
    sweep.out_dir = sweep.out_dir or os.path.join("runs", "ablations", sweep.name)
    if not len(sweep.axes.variants):
        from lightning_modules.variants import variant_names

        sweep.axes.variants = variant_names()
    for key in ("seeds", "decode_steps", "cfg_scales", "schedules"):
        if not len(sweep.axes[key]):
            raise ConfigError(f"axes.{key}", "must list at least one value")
    return sweep


def arm_spec(spec: str) -> tuple[str, str, list[str]]:
    """An axes.variants entry -> (its label for run names and tables, its ordering, its config overrides).

    "randar" -> ("randar", "randar", [model.variant=randar]); "scan@hilbert" -> ("scan-hilbert", "scan",
    [model.variant=scan, model.scan=hilbert]): a scan is part of the ordering axis, so scans and orderings sweep as
    one. ("@", not ":", so that the entries stay plain YAML in a flow list: axes.variants=[raster,scan@hilbert].)"""
    variant, _, scan = str(spec).partition("@")
    overrides = [f"model.variant={variant}"] + ([f"model.scan={scan}"] if scan else [])
    return (f"{variant}-{scan}" if scan else variant), variant, overrides


def arm_overrides(sweep: DictConfig, ordering: str) -> list[str]:
    """The sweep's ``arm_overrides`` of one ordering; a key that names no registered ordering is an error (a
    registered one the axes leave out is allowed: the demo narrows axes.variants to the arms asked for)."""
    from lightning_modules.variants import variant_names

    unknown = sorted(set(sweep.arm_overrides) - set(variant_names()))
    if unknown:
        raise ConfigError(f"arm_overrides.{unknown[0]}", f"not an ordering (choose from {sorted(variant_names())})")
    return [str(kv) for kv in sweep.arm_overrides.get(ordering, [])]


def training_arms(sweep: DictConfig, extra: list[str] = ()) -> list[Arm]:
    """variants x sizes x seeds, each the base preset + overrides + its axis values; equal compute asserted."""
    arms = []
    # the size an arm gets when axes.sizes is empty: the base preset's after every override (extra included, so a
    # caller's model.size=... is not silently replaced by the preset's)
    base_size = load_config([sweep.base], [*sweep.overrides, *extra]).model.size
    for spec in sweep.axes.variants:
        variant, ordering, ordering_overrides = arm_spec(spec)
        ordering_overrides += arm_overrides(sweep, ordering)
        for size in list(sweep.axes.sizes) or [base_size]:
            for seed in sweep.axes.seeds:
                cfg = load_config([sweep.base], [*sweep.overrides, *extra, *ordering_overrides,
                                                 f"model.size={size}", f"seed={seed}", f"out_dir={sweep.out_dir}"])
                name = sweep.run_name.format(variant=variant, size=size, seed=seed, hash=config_hash(cfg))
                cfg.name = name
                arms.append(Arm(variant, size, int(seed), cfg, name, os.path.join(sweep.out_dir, name)))
    budgets = {(a.cfg.trainer.global_batch_size, a.cfg.trainer.max_steps) for a in arms}
    if len(budgets) != 1:
        raise ConfigError("overrides", f"arms differ in (global batch, steps) {sorted(budgets)}; equal compute "
                                       f"needs one budget")
    if len({a.name for a in arms}) != len(arms):
        raise ConfigError("run_name", f"{sweep.run_name!r} gives two arms the same run folder")
    return arms


def finished_metrics(arm: Arm) -> dict | None:
    """metrics.json of a finished run of exactly this config (train's test: last.ckpt at the final step), else None."""
    from experiments.train import finished_run

    return finished_run(arm.cfg, arm.run_dir)


def _checkpoint(arm: Arm) -> str:
    return os.path.join(arm.run_dir, "checkpoints", "last.ckpt")


# ---------------------------------------------------------------------------------------------------- executors
def train_local(arms: list[Arm], log=print) -> None:
    from experiments import train  # attribute access, so a test can spy on train.run
    from lightning_modules.progress import Progress

    with Progress(len(arms), "ablate: arms trained", "arms") as bar:
        for i, arm in enumerate(arms):
            log(f"ablate: training {arm.name} ({i + 1}/{len(arms)}, {arm.cfg.trainer.max_steps} steps)")
            train.run(arm.cfg, quiet=True)
            bar.update()


def submit_slurm(arms: list[Arm], launch_args: list[str] = (), log=print) -> None:
    """One `python -m experiments.launch -c <run>/config.yaml [launch_args]` per arm (the project's SLURM launcher,
    which runs experiments.train.run in the job; the saved config carries the arm's name and out_dir)."""
    if importlib.util.find_spec("experiments.launch") is None:
        raise RuntimeError("--executor slurm: experiments.launch (the SLURM launcher) is not installed; "
                           "use --executor local")
    for arm in arms:
        os.makedirs(arm.run_dir, exist_ok=True)
        path = os.path.join(arm.run_dir, "config.yaml")
        OmegaConf.save(arm.cfg, path)
        subprocess.run([sys.executable, "-m", "experiments.launch", "-c", path, *launch_args], check=True)
        log(f"ablate: submitted {arm.name}")


# ---------------------------------------------------------------------------------------------------- evaluation
def sample_extras(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key.startswith("sample.") or key[7:] not in SampleConfig.__dataclass_fields__ or not value:
            raise ConfigError("eval.sample", f"{item!r} is not sample.<{'|'.join(SampleConfig.__dataclass_fields__)}>"
                                             f"=value")
        out[key[7:]] = OmegaConf.from_dotlist([f"x={value}"]).x
    return out


def load_module(arm: Arm, device: str = ""):
    """The generator of a finished run (its EMA weights when it trained with EMA, as the FID callback uses)."""
    import torch

    from experiments.checkpoints import load_generator

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_generator(_checkpoint(arm), device=device, ema=arm.cfg.callbacks.ema_decay > 0).eval()


class FidScorer:
    """The extractor and reference, loaded once per sweep (digits weights trained when missing)."""

    def __init__(self, ev: DictConfig):
        from lightning_modules.metrics.extractors import load_extractor

        self.ev = ev
        if ev.extractor == "digits" and ev.extractor_weights and not os.path.isfile(ev.extractor_weights):
            from experiments.fid_setup import ensure_digits_extractor

            print(f"ablate: training the digits feature extractor -> {ev.extractor_weights}", flush=True)
            ensure_digits_extractor(ev.extractor_weights)
        self.extractor = load_extractor(ev.extractor, ev.extractor_weights)
        self.ref = None

    def fid(self, images) -> float:
        from lightning_modules.metrics.reference import extract_stats, resolve_reference
        from lightning_modules.metrics.scores import fid_from_stats

        if self.ref is None:
            self.ref = resolve_reference(self.ev.reference, self.extractor, image_size=images.shape[-2],
                                         need_features=False)
        stats, _ = extract_stats(self.extractor, (images[i:i + 500] for i in range(0, len(images), 500)),
                                 total=len(images))
        return float(fid_from_stats(stats["mu"], stats["sigma"], self.ref.mu, self.ref.sigma))

    def class_consistency(self, images, labels) -> float | None:
        """Share of the samples the extractor's classifier assigns to their conditioning class; None for an
        extractor without a classifier head (Inception features)."""
        from lightning_modules.metrics.consistency import class_consistency

        if not self.extractor.scores_labels:
            return None
        return class_consistency(self.extractor, images, labels)


def evaluation_settings(module, sweep: DictConfig) -> tuple[list[dict], list[str]]:
    """Resolved, de-duplicated evaluation arms of one module -> (list of sample overrides, skipped reasons)."""
    import torch

    extras = sample_extras(list(sweep.eval.sample))
    arms, skipped, seen = [], [], set()
    for schedule in sweep.axes.schedules:
        for steps in sweep.axes.decode_steps:
            for cfg_scale in sweep.axes.cfg_scales:
                over = {**extras, "schedule": schedule or None, "num_steps": int(steps) or None,
                        "cfg_scale": float(cfg_scale)}
                s = module.sample_settings(**over)
                try:  # the ordering's own plan says whether it can run this setting
                    module.ordering.decode_plan(1, s.num_steps, s.schedule,
                                                torch.Generator(module.device).manual_seed(0), device=module.device)
                except ValueError as err:
                    skipped.append(f"schedule={schedule or 'default'} steps={steps or 'default'}: {err}")
                    continue
                key = (s.schedule, s.num_steps, s.cfg_scale)
                if key not in seen:
                    seen.add(key)
                    arms.append(dict(over, schedule=s.schedule, num_steps=s.num_steps))
    return arms, skipped


def evaluate_arm(arm: Arm, sweep: DictConfig, scorer: FidScorer | None, log=print) -> list[dict]:
    """Rows (one per evaluation setting) for a finished arm; cached in <run>/ablation_eval.json."""
    from lightning_modules.sample_set import count_tag, timed_sample_set

    cache_path = os.path.join(arm.run_dir, EVAL_CACHE)
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
    module = load_module(arm, sweep.eval.device)
    ev, m = sweep.eval, arm.metrics
    settings, skipped = evaluation_settings(module, sweep)
    for reason in dict.fromkeys(skipped):  # once per setting, not once per CFG scale
        log(f"ablate: {arm.name}: skipped {reason}")
    n = ev.fid_samples if scorer is not None else (ev.ips_samples or ev.batch_size)
    protocol = dict(n=n, seed=ev.seed, batch=ev.batch_size,
                    extractor=getattr(scorer.extractor, "name", "") if scorer else "", reference=ev.reference)
    rows = []
    for over in settings:
        key = json.dumps(dict(hash=m["config_hash"], steps=m["steps"], sample=over, **protocol), sort_keys=True)
        if key not in cache:
            images, labels_all, images_per_s = timed_sample_set(module, n, ev.batch_size, ev.seed, **over)
            cache[key] = {"images_per_s": images_per_s,
                          "fid": scorer.fid(images) if scorer is not None else None,
                          "class_consistency": (scorer.class_consistency(images, labels_all)
                                                if scorer is not None else None)}
            log(f"ablate: {arm.name}: steps={over['num_steps']} cfg={over['cfg_scale']:g} "
                f"{over['schedule']}: " + ", ".join(f"{k} {v:.4g}" for k, v in cache[key].items() if v is not None))
        rows.append({"variant": arm.variant, "size": arm.size, "seed": arm.seed, "schedule": over["schedule"],
                     "decode_steps": over["num_steps"], "cfg_scale": over["cfg_scale"], "train_steps": m["steps"],
                     "tokens_seen": m["tokens_seen"], "val_nll": m["val_nll_bits"],
                     "fid": cache[key]["fid"], "class_consistency": cache[key].get("class_consistency"),
                     "fid_samples": n if scorer is not None else 0,
                     "fid_tag": f"fid{count_tag(n)}" if scorer is not None else "",
                     "images_per_s": cache[key]["images_per_s"], "params_M": m["params"] / 1e6, "run": arm.name})
    tmp = cache_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, cache_path)
    return rows


# ---------------------------------------------------------------------------------------------------- driver
def run_sweep(path: str, executor: str = "local", collect_only: bool = False, overrides: list[str] = (),
              extra: list[str] = (), launch_args: list[str] = (), log=print) -> dict:
    """Train what is missing (unless collect-only), evaluate finished arms, write tables and plots.

    overrides: of the sweep file (e.g. out_dir=..., axes.seeds=[0,1]); extra: config overrides for every arm."""
    from experiments.ablation_collect import write_outputs
    from lightning_modules.progress import Progress

    sweep = load_sweep(path, overrides)
    arms = training_arms(sweep, extra)
    missing = [a for a in arms if finished_metrics(a) is None]
    log(f"ablate: {sweep.name}: {len(arms)} training arms, {len(arms) - len(missing)} finished")
    if missing and not collect_only:
        if executor == "slurm":
            submit_slurm(missing, launch_args, log)
        else:
            train_local(missing, log)
    for arm in arms:
        arm.metrics = finished_metrics(arm)
    done = [a for a in arms if a.metrics is not None]
    tokens = {a.metrics["tokens_seen"] for a in done}
    if len(tokens) > 1:
        raise RuntimeError(f"ablate: finished arms saw different token counts {sorted(tokens)}: not equal compute")
    scorer = FidScorer(sweep.eval) if sweep.eval.fid_samples and done else None
    rows = []
    with Progress(len(done), "ablate: arms evaluated", "arms") as bar:
        for arm in done:
            rows += evaluate_arm(arm, sweep, scorer, log)
            bar.update()
    return write_outputs(sweep, arms, rows, log)


@ends_in_one_line  # Ctrl-C / SIGTERM while an arm trains: one line, 130 / 143 (experiments/signals.py)
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, metavar="SWEEP.yaml")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--collect-only", action="store_true", help="never train; collect finished runs")
    p.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                   help="passed on to experiments.launch, e.g. --launch-arg=--partition=P --launch-arg=--time=600")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the sweep file")
    a = p.parse_args(argv)
    try:
        out = run_sweep(a.config, a.executor, a.collect_only, a.overrides, launch_args=a.launch_arg)
    except (ConfigError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"ablate: table {out['markdown']} (CSV {out['csv']}), plots in {out['plots_dir']}, "
          f"TensorBoard: .venv/bin/tensorboard --logdir {out['tb_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
