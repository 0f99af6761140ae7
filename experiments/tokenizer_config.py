"""Typed settings of ``experiments.train_tokenizer``: dataclass defaults <- -c YAML <- flags <- --set KEY=VALUE.

As for the experiment config (experiments/config.py), an unknown key, a wrong type or a bad value is a
``ConfigError`` naming the key (the CLI prints one line and exits 2), and a key set where nothing reads it is an
error too (``TOKENIZER_READERS`` in experiments/readers.py says who reads each key):

    error: config data.train_shards: is only read when data.kind=shards (here data.kind=digits); ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from experiments.config import ConfigError, _omegaconf_error, _preset_path

DATA_KINDS = ("digits", "shards")
UPSAMPLE = ("pil_bicubic", "bilinear", "nearest", "bicubic")  # pil_bicubic = the image DataModule's resize
EXTRACTORS = ("", "digits", "shards", "inception", "none")


@dataclass
class TokenizerSection:
    preset: str = "digits"  # tokenizers.vq.PRESETS
    vq: dict = field(default_factory=dict)  # overrides of the preset's constructor arguments


@dataclass
class DataSection:
    kind: str = "digits"  # digits (the embedded digits, upscaled) | shards (your image shards: datamodules.shards)
    image_size: int = 32
    batch_size: int = 64
    upsample: str = "pil_bicubic"  # digits: how the 8x8 digits are upscaled
    seed: int = 0  # digits: train/val split seed
    train_shards: str = ""  # shards: brace pattern / glob of image shards
    val_shards: str = ""  # shards: PSNR / rFID are measured on these
    center_crop: str = "adm"  # shards: adm (what pretokenize encodes) | none (plain resize)
    random_flip: bool = True  # shards
    num_workers: int = 0  # shards: DataLoader workers
    val_count: int = 1000  # shards: the first N val images (PSNR, rFID, reconstructions.png)


@dataclass
class TrainSection:
    max_steps: int = 400
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    rec_loss: str = "l2"  # l1 | l2
    disc_start: int = -1  # >= 0: PatchGAN hinge discriminator from that batch on
    disc_weight: float = 0.1
    disc_layers: int = 2
    disc_ndf: int = 32
    perceptual_weight: float = 0.0  # > 0 needs perceptual_path, a LOCAL torchvision-vgg16 weights file
    perceptual_path: str = ""
    val_every_epochs: int = 5  # digits
    val_every_steps: int = 0  # shards: 0 = validate once, at the end
    num_threads: int = 0  # 0 = torch default
    accelerator: str = "cpu"  # cpu | gpu | auto (the VQ-16 at 256 px wants a GPU; a CPU only smoke-tests it)
    tf32: bool = True  # CUDA: TF32 matmuls / convs while training, as LlamaGen's VQ trainer; encode/decode stay IEEE
    # rFID: "" = digits for data.kind=digits, shards for data.kind=shards; inception (natural images); none = skip
    extractor: str = ""
    extractor_weights: str = ""  # "" = the default digits CNN; shards: experiments.train_extractor --shards


@dataclass
class TokenizerTrainConfig:
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


def extractor_kind(cfg: DictConfig) -> str:
    return cfg.train.extractor or ("digits" if cfg.data.kind == "digits" else "shards")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg: DictConfig) -> None:
    from experiments.readers import TOKENIZER_READERS, check_unread
    from tokenizers.vq import PRESETS, preset_config

    d, t = cfg.data, cfg.train
    _check(cfg.tokenizer.preset in PRESETS, "tokenizer.preset",
           f"{cfg.tokenizer.preset!r} is not one of {sorted(PRESETS)}")
    try:
        vq = preset_config(cfg.tokenizer.preset, **OmegaConf.to_container(cfg.tokenizer.vq))
    except ValueError as err:  # "tokenizer.<key>: not a LlamaGen VQ option (...)"
        key, _, message = str(err).partition(": ")
        raise ConfigError(key.replace("tokenizer.", "tokenizer.vq.", 1), message) from None
    _check(d.kind in DATA_KINDS, "data.kind", f"{d.kind!r} is not one of {list(DATA_KINDS)}")
    _check(d.image_size >= 8, "data.image_size", f"{d.image_size} must be >= 8")
    down = 2 ** (len(vq["encoder_ch_mult"]) - 1)  # the VQ's downsampling (tokenizers/vq.py: one halving per level)
    _check(d.image_size % down == 0, "data.image_size", f"{d.image_size} is not divisible by the VQ's downsampling "
                                                        f"{down} (tokenizer.vq.encoder_ch_mult)")
    _check(d.batch_size >= 1, "data.batch_size", f"{d.batch_size} must be >= 1")
    _check(d.upsample in UPSAMPLE, "data.upsample", f"expected one of {', '.join(UPSAMPLE)}, got {d.upsample!r}")
    _check(d.center_crop in ("adm", "none"), "data.center_crop", f"{d.center_crop!r} is not one of ['adm', 'none']")
    _check(d.num_workers >= 0, "data.num_workers", f"{d.num_workers} must be >= 0")
    _check(d.val_count >= 1, "data.val_count", f"{d.val_count} must be >= 1")
    if d.kind == "shards":
        _check(bool(d.train_shards), "data.train_shards", "data.kind=shards needs the image shards to train on")
        _check(bool(d.val_shards), "data.val_shards", "data.kind=shards needs val shards (PSNR and rFID are "
                                                      "measured on them)")
    _check(t.max_steps >= 1, "train.max_steps", f"{t.max_steps} must be >= 1")
    _check(t.lr > 0, "train.lr", f"{t.lr} must be > 0")
    _check(t.rec_loss in ("l1", "l2"), "train.rec_loss", f"expected 'l1' or 'l2', got {t.rec_loss!r}")
    _check(t.val_every_epochs >= 1, "train.val_every_epochs", f"{t.val_every_epochs} must be >= 1")
    _check(t.val_every_steps >= 0, "train.val_every_steps", f"{t.val_every_steps} must be >= 0 (0 = at the end)")
    _check(t.accelerator in ("cpu", "gpu", "cuda", "auto"), "train.accelerator",
           f"{t.accelerator!r} is not one of ['cpu', 'gpu', 'cuda', 'auto']")
    _check(t.extractor in EXTRACTORS, "train.extractor", f"{t.extractor!r} is not one of {list(EXTRACTORS)}")
    kind = extractor_kind(cfg)
    _check(not (d.kind == "digits" and kind == "shards"), "train.extractor", "shards is for data.kind=shards")
    _check(kind not in ("shards", "inception") or bool(t.extractor_weights), "train.extractor_weights",
           f"the {kind} extractor needs a local weights file (shards: python -m experiments.train_extractor --shards "
           f"...; inception: weights-inception-2015-12-05-6726825d.pth), or set train.extractor=none")
    if t.perceptual_weight > 0:
        _check(bool(t.perceptual_path), "train.perceptual_path", "perceptual_weight > 0 needs a local VGG16 file")
    check_unread(cfg, OmegaConf.structured(TokenizerTrainConfig), TOKENIZER_READERS)


def load_tokenizer_config(path: str | None, flags: dict, sets: list[str]) -> dict:
    """Defaults <- YAML <- flags ({dotted key: value or None}) <- --set items; validated; a plain dict."""
    cfg = OmegaConf.structured(TokenizerTrainConfig)
    if path:
        if not os.path.isfile(_preset_path(path)):
            raise ConfigError("-c", f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(_preset_path(path)))
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, path) from None
    items = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(sets or [])
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise ConfigError(item, "expected KEY=VALUE, e.g. train.lr=5e-4")
        try:
            node = OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else cfg
            leaf = key.rpartition(".")[2]
            if isinstance(node, DictConfig) and isinstance(node._get_node(leaf), StringNode):
                OmegaConf.update(cfg, key, value, merge=True)  # a string key takes the text verbatim
            else:
                typed = OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"]  # YAML: 5e-4 -> float
                OmegaConf.update(cfg, key, typed, merge=True)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, "--set") from None
    validate(cfg)
    return OmegaConf.to_container(cfg, resolve=True)
