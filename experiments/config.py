"""Typed experiment configuration: dataclass defaults, OmegaConf YAML presets merged on top, dotlist overrides.

    cfg = load_config(["experiments/configs/demo/raster.yaml"], ["trainer.max_steps=200"])

Unknown keys and wrong types fail in OmegaConf's structured merge; values are checked by ``validate``. Every
problem becomes a ``ConfigError`` whose one-line message starts with the dotted key (CLIs exit 2 with it).
Global batch size and global seed are the user's knobs; the per-device batch and accumulation are derived.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The generator's own settings live beside the module that reads them (one set of defaults); composed here.
from lightning_modules.hparams import (Kernels, LlamaOptions, ModelConfig, OptimConfig,  # noqa: F401
                                      RarVitOptions, SampleConfig)


# Fixed choices are Literal fields (OmegaConf refuses other values at merge, naming the key); registry choices
# (tokenizer.kind, model.variant, ...) stay str and experiments/validate.py checks them (lightning_modules/hparams.py).
DataKind = Literal["embedded", "images", "codes"]
CenterCrop = Literal["adm", "none"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda"]
Strategy = Literal["auto", "ddp", "ddp_spawn", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"]
Precision = Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"]
Extractor = Literal["digits", "inception", "shards"]


class ConfigError(ValueError):
    """A bad config value; ``str(err)`` is one line naming the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class TokenizerConfig:
    kind: str = "pixel"  # pixel | codes | llamagen_vq | maskgit_vq | digits_vq
    path: str = ""  # local weights file (never downloaded)
    levels: int = 17  # pixel tokenizer
    vocab_size: int = 0  # codes-only tokenizer
    options: dict = field(default_factory=dict)  # extra constructor arguments (VQ preset, ...)


@dataclass
class DataConfig:
    kind: DataKind = "embedded"
    root: str = ".cache/digits"  # embedded: where the digits shards are written
    train_shards: str = ""
    val_shards: str = ""
    image_size: int = 8
    center_crop: CenterCrop = "none"
    random_flip: bool = False
    num_workers: int = 0
    samples_per_epoch: int = 0  # 0 = from the manifest
    code_dir: str = ""  # codes: folder holding manifest.json


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    global_batch_size: int = 64
    micro_batch_size: int = 0  # 0 = global / world size (no accumulation)
    accelerator: Accelerator = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: Strategy = "auto"
    precision: Precision = "32-true"
    val_every_steps: int = 250
    limit_val_batches: int = 0  # 0 = the whole validation split
    log_every_steps: int = 10
    ckpt_every_steps: int = 250
    compile: bool = False
    # the training linears' kernels: auto (oneDNN for fp32 linears >= 2^17 weights on a CPU; the rest torch's) | aten
    # | onednn (every linear; CPU and 32-true only). Validation and sampling keep torch's / sample.kernels' kernels.
    kernels: Kernels = "auto"
    deterministic: bool = False
    # CUDA fp32 matmuls / cuDNN convolutions in TF32 for the run, as LlamaGen's, ARPG's and RAR's trainers set it
    # (lightning_modules/tf32.py; sampling events follow sample.tf32); nothing changes on a CPU
    tf32: bool = True
    fast_dev_run: bool = False
    # a rank with no progress (no Lightning hook started or ended) this long ends the run with one line naming the
    # rank, step and hook; the DDP / DeepSpeed process-group timeout is this + max(60, 10%) (experiments/watchdog.py)
    collective_timeout_s: float = 1800.0
    # SIGTERM / SIGINT: the ranks stop at the next step boundary after saving last.ckpt; past this, killed unsaved
    stop_grace_s: float = 120.0


@dataclass
class CallbacksConfig:
    ema_decay: float = 0.0  # 0 = no EMA
    sample_every_steps: int = 250  # 0 = off
    sample_classes: list[int] = field(default_factory=list)  # [] = every class
    sample_per_class: int = 4
    sample_seed: int = 0
    order_map_every_steps: int = 0


@dataclass
class EvalConfig:
    fid_every_steps: int = 0  # 0 = only at the end when fid_num_samples > 0
    fid_num_samples: int = 0  # 0 = no FID
    extractor: Extractor = "digits"  # digits | inception | shards (a CNN trained on your shards: train_extractor)
    extractor_weights: str = ""  # digits / shards extractor file
    inception_weights: str = ""
    reference: str = ""  # ADM .npz, or empty = computed from the val shards and cached


@dataclass
class ExperimentConfig:
    name: str = ""  # "" = derived from the config (deterministic)
    seed: int = 0
    out_dir: str = "runs"
    resume: str = "auto"  # auto | never | path to a checkpoint
    init_from: str = ""  # weights to start from (e.g. an imported official checkpoint), not a resume
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "not in" in msg or "Key" in msg and "not" in msg:
        msg = f"unknown key ({source})"
    elif "Value '" in msg or "could not be converted" in msg or "Invalid type" in msg:
        msg = f"wrong type: {msg} ({source})"
    elif msg.startswith("Invalid value '") and ", expected one of [" in msg:  # a Literal field: say it as validate does
        value, _, choices = msg[len("Invalid value '"):].partition("', expected one of ")
        quote = " (YAML read it as a number or a bool: quote it)" if repr(value) in choices else ""
        msg = f"{value!r} is not one of {choices}{quote} ({source})"
    return ConfigError(key, msg)


def _is_string_field(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is a typed ``str`` field (or a Literal of strings) of the structured config: its command-line
    value is taken verbatim (``trainer.precision=32`` is the string "32", not the number)."""
    from omegaconf import LiteralNode, StringNode

    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    node = parent._get_node(leaf) if isinstance(parent, DictConfig) else None
    if isinstance(node, LiteralNode):
        return all(isinstance(c, str) for c in get_args(node._metadata.ref_type))
    return isinstance(node, StringNode)


def _preset_path(path: str) -> str:
    """``path`` itself when it exists; else, for a relative path, the same path under the folder that holds the
    ``experiments`` package: the shipped presets (``experiments/configs/...``) are found from any working
    directory, in a checkout and in an installed wheel (site-packages/experiments/configs) alike."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    return shipped if os.path.isfile(shipped) else path


def load_config(yaml_files: list[str] = (), overrides: list[str] = ()) -> DictConfig:
    """Defaults <- each YAML in order <- dotlist overrides; then the data's defaults (experiments/data_defaults.py:
    model.num_classes from the shards' classes unless set) and ``validate``. Raises ConfigError."""
    cfg = OmegaConf.structured(ExperimentConfig)
    num_classes_set = any(item.partition("=")[0] == "model.num_classes" for item in overrides)
    for path in yaml_files:
        try:
            layer = OmegaConf.load(_preset_path(path))
        except FileNotFoundError:
            raise ConfigError("-c", f"config file not found: {path}") from None
        except Exception as err:  # YAML syntax
            raise ConfigError("-c", f"cannot parse {path}: {str(err).splitlines()[0]}") from None
        num_classes_set |= (isinstance(layer, DictConfig)
                            and OmegaConf.select(layer, "model.num_classes", default=None) is not None)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, path) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.sub=value")
        try:
            key, _, raw = item.partition("=")
            if _is_string_field(cfg, key):  # YAML would read name=off as False and tokenizer.path=1e3 as 1000.0
                quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
                OmegaConf.update(cfg, key, raw[1:-1] if quoted else raw, merge=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, "command line") from None
    from experiments.data_defaults import apply_data_defaults
    from experiments.validate import validate

    apply_data_defaults(cfg, num_classes_set)
    validate(cfg)
    return cfg


# Keys added since trainer.tf32 (2026-12-07), each with the default it was added with: left out of the hash at that
# value (a key at another value still changes it), so a run, a requeued SLURM job or a finished sweep arm keeps its
# name, and resumes or is skipped, across an upgrade that adds a key. A new key goes here (tests/test_config.py pins
# the demo preset's hash).
HASH_NEUTRAL = {"trainer.tf32": True, "sample.tf32": True}


def config_hash(cfg: DictConfig) -> str:
    """Hash of everything that changes the result (not where it is written or whether it resumes)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in ("name", "out_dir", "resume"):
        data.pop(key, None)
    for key, value in HASH_NEUTRAL.items():
        section, leaf = key.split(".")
        if leaf in data.get(section, {}) and data[section][leaf] == value:
            del data[section][leaf]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


# Keys that say how a run is operated, not what it computes. They stay in the hash (taking them out would rename
# every run whose preset sets them); a new run that differs from an existing one only in these is pointed to it.
OPERATIONAL = ("trainer.log_every_steps", "trainer.ckpt_every_steps", "trainer.collective_timeout_s",
               "trainer.stop_grace_s")


def operational_twin(cfg: DictConfig) -> tuple[str, list[str]] | None:
    """(name, differing keys) of a run in ``out_dir`` that is this config but for OPERATIONAL keys, or None."""
    import glob

    prefix = run_name(cfg).rsplit("-", 1)[0] + "-"  # variant-flavour-size-s<seed>-
    mine = config_hash(cfg)
    for path in sorted(glob.glob(os.path.join(glob.escape(cfg.out_dir), glob.escape(prefix) + "*", "config.yaml"))):
        try:
            other = OmegaConf.load(path)
        except (OSError, OmegaConfBaseException):
            continue
        if other.get("name"):
            continue
        theirs = {k: OmegaConf.select(other, k) for k in OPERATIONAL if OmegaConf.select(other, k) !=
                  OmegaConf.select(cfg, k)}
        for key in theirs:
            OmegaConf.update(other, key, OmegaConf.select(cfg, key))
        if theirs and config_hash(other) == mine:
            return os.path.basename(os.path.dirname(path)), [f"{k}={v}" for k, v in theirs.items()]
    return None


def run_name(cfg: DictConfig) -> str:
    if cfg.name:
        return cfg.name
    m = cfg.model
    return f"{m.variant}-{m.flavour}-{m.size}-s{cfg.seed}-{config_hash(cfg)}"


def batch_layout(cfg: DictConfig) -> tuple[int, int, int]:
    """(world size, per-device micro batch, gradient accumulation) derived from the global batch."""
    t = cfg.trainer
    world = t.devices * t.num_nodes
    per_device = t.global_batch_size // world
    micro = t.micro_batch_size or per_device
    accumulate = per_device // micro
    assert micro * accumulate * world == t.global_batch_size, "validated in experiments.validate"
    return world, micro, accumulate


def to_plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
