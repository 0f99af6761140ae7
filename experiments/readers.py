"""Who reads each experiment-config key, and when: a key set for a run in which nothing reads it is an error.

Every leaf of ``ExperimentConfig`` is listed in ``READERS``: ``ALWAYS`` (some constructor always reads it) or a
``When`` rule naming the condition under which it is read. ``check_unread`` refuses a key that differs from its
default while its rule says nothing reads it, with one line naming the key and what would read it:

    data.code_dir: is only read when data.kind=codes (here data.kind=embedded)

Ordering-specific model keys (``model.scan``, ``model.rar_anneal_*``) are declared by the orderings themselves
(``Ordering.reads``) and checked in ``validate_ordering``. tests/test_config.py checks that every leaf is listed
here, so a new key cannot be added without saying who reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from experiments.config import ConfigError

ALWAYS = "always"
VQ_KINDS = ("llamagen_vq", "maskgit_vq", "digits_vq")


@dataclass(frozen=True)
class When:
    reads: Callable[[DictConfig], bool]  # is the key read in this config?
    condition: str  # "data.kind=codes"
    context: Callable[[DictConfig], str]  # what this config has instead: "data.kind=embedded"


def _kind(section: str, *kinds: str) -> When:
    return When(lambda c: c[section].kind in kinds, f"{section}.kind={'|'.join(kinds)}",
                lambda c: f"{section}.kind={c[section].kind}")


def _flavour(name: str) -> When:
    return When(lambda c: c.model.flavour == name, f"model.flavour={name}",
                lambda c: f"model.flavour={c.model.flavour}")


def _cfg_schedule(c: DictConfig) -> str:
    from lightning_modules.variants import ordering_class

    return c.sample.cfg_schedule or ordering_class(c.model.variant).default_sample.get("cfg_schedule", "constant")


def _schedule(name: str) -> When:
    return When(lambda c: _cfg_schedule(c) == name, f"the CFG schedule is {name}",
                lambda c: f"CFG schedule {_cfg_schedule(c)} for model.variant={c.model.variant}")


FID = When(lambda c: c.eval.fid_num_samples > 0, "eval.fid_num_samples > 0", lambda c: "eval.fid_num_samples=0")
GRID_OR_MAP = When(lambda c: c.callbacks.sample_every_steps > 0 or c.callbacks.order_map_every_steps > 0,
                   "callbacks.sample_every_steps or callbacks.order_map_every_steps > 0", lambda c: "both are 0")
GRID = When(lambda c: c.callbacks.sample_every_steps > 0, "callbacks.sample_every_steps > 0",
            lambda c: "callbacks.sample_every_steps=0")
SAMPLING_CALLBACK = When(lambda c: GRID_OR_MAP.reads(c) or FID.reads(c),
                         "a sample grid, an order map or FID is on", lambda c: "none is")


def _fid_extractor(*kinds: str) -> When:
    return When(lambda c: FID.reads(c) and c.eval.extractor in kinds, f"eval.fid_num_samples > 0 and "
                f"eval.extractor={'|'.join(kinds)}", lambda c: f"eval.fid_num_samples={c.eval.fid_num_samples}, "
                                                             f"eval.extractor={c.eval.extractor}")


READERS: dict[str, str | When | None] = {
    **{k: ALWAYS for k in ("name", "seed", "out_dir", "resume", "init_from")},
    # model: the ordering-specific keys are the orderings' own (Ordering.reads; None here = checked there)
    **{f"model.{k}": ALWAYS for k in ("variant", "flavour", "size", "dim", "n_layer", "n_head", "ffn_hidden",
                                      "num_classes", "class_dropout", "grad_checkpointing")},
    **{f"model.{k}": None for k in ("rar_anneal_start", "rar_anneal_end", "scan", "scan_seed")},
    **{f"model.llama.{k}": _flavour("llama") for k in ("token_dropout", "resid_dropout", "ffn_dropout", "norm_eps",
                                                        "rope_base", "class_rope")},
    **{f"model.rar_vit.{k}": _flavour("rar_vit") for k in ("dropout", "attn_dropout")},
    "tokenizer.kind": ALWAYS, "tokenizer.options": ALWAYS,
    "tokenizer.path": _kind("tokenizer", *VQ_KINDS), "tokenizer.levels": _kind("tokenizer", "pixel"),
    "tokenizer.vocab_size": _kind("tokenizer", "codes"),
    **{f"data.{k}": ALWAYS for k in ("kind", "image_size", "num_workers", "samples_per_epoch")},
    "data.root": _kind("data", "embedded"), "data.code_dir": _kind("data", "codes"),
    "data.train_shards": _kind("data", "images", "codes"), "data.val_shards": _kind("data", "images", "codes"),
    "data.center_crop": _kind("data", "embedded", "images"), "data.random_flip": _kind("data", "embedded", "images"),
    **{f"optim.{k}": ALWAYS for k in ("lr", "betas", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio",
                                      "grad_clip", "no_decay_names", "max_nonfinite_in_a_row")},
    **{f"trainer.{k}": ALWAYS for k in ("max_steps", "global_batch_size", "micro_batch_size", "accelerator",
                                        "devices", "num_nodes", "strategy", "precision", "val_every_steps",
                                        "limit_val_batches", "log_every_steps", "ckpt_every_steps", "compile",
                                        "kernels", "deterministic", "fast_dev_run", "collective_timeout_s",
                                        "stop_grace_s", "tf32")},
    **{f"sample.{k}": ALWAYS for k in ("num_steps", "schedule", "cfg_scale", "cfg_schedule", "temperature", "top_k",
                                       "top_p", "mode", "draw", "precision", "compile", "kernels", "tf32")},
    "sample.cfg_power": _schedule("pow_cosine"), "sample.cfg_start": _schedule("linear"),
    "callbacks.ema_decay": ALWAYS, "callbacks.sample_every_steps": ALWAYS, "callbacks.order_map_every_steps": ALWAYS,
    "callbacks.sample_classes": GRID_OR_MAP, "callbacks.sample_per_class": GRID,
    "callbacks.sample_seed": SAMPLING_CALLBACK,
    "eval.fid_num_samples": ALWAYS, "eval.fid_every_steps": FID, "eval.extractor": FID, "eval.reference": FID,
    "eval.extractor_weights": _fid_extractor("digits", "shards"), "eval.inception_weights": _fid_extractor("inception"),
}


def _tok_extractor(*kinds: str) -> When:
    from experiments.tokenizer_config import extractor_kind

    return When(lambda c: extractor_kind(c) in kinds, f"the rFID extractor is {'|'.join(kinds)}",
                lambda c: f"train.extractor={extractor_kind(c)}")


# experiments.train_tokenizer's config (experiments/tokenizer_config.py), checked the same way
DISC = When(lambda c: c.train.disc_start >= 0, "train.disc_start >= 0",
            lambda c: f"train.disc_start={c.train.disc_start}")
TOKENIZER_READERS: dict[str, str | When | None] = {
    "tokenizer.preset": ALWAYS, "tokenizer.vq": ALWAYS,
    **{f"data.{k}": ALWAYS for k in ("kind", "image_size", "batch_size")},
    **{f"data.{k}": _kind("data", "digits") for k in ("upsample", "seed")},
    **{f"data.{k}": _kind("data", "shards") for k in ("train_shards", "val_shards", "center_crop", "random_flip",
                                                      "num_workers", "val_count")},
    **{f"train.{k}": ALWAYS for k in ("max_steps", "seed", "lr", "weight_decay", "rec_loss", "disc_start",
                                      "perceptual_weight", "num_threads", "accelerator", "tf32", "extractor")},
    **{f"train.{k}": DISC for k in ("disc_weight", "disc_layers", "disc_ndf")},
    "train.perceptual_path": When(lambda c: c.train.perceptual_weight > 0, "train.perceptual_weight > 0",
                                  lambda c: f"train.perceptual_weight={c.train.perceptual_weight}"),
    "train.val_every_epochs": _kind("data", "digits"), "train.val_every_steps": _kind("data", "shards"),
    "train.extractor_weights": _tok_extractor("digits", "shards", "inception"),
}
FREE_FORM = ("tokenizer.options", "tokenizer.vq")  # constructor arguments, checked by their constructors


def config_leaves(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the config (``tokenizer.options`` counts as one leaf: free-form constructor arguments)."""
    out = []
    for key in cfg:
        node = cfg._get_node(key)
        full = f"{prefix}{key}"
        if OmegaConf.is_dict(node) and full not in FREE_FORM:
            out += config_leaves(node, f"{full}.")
        else:
            out.append(full)
    return out


def check_unread(cfg: DictConfig, defaults: DictConfig, readers: dict | None = None) -> None:
    """Refuse a key that differs from its default in a config where nothing reads it (one ConfigError line)."""
    for key, rule in (READERS if readers is None else readers).items():
        if not isinstance(rule, When) or rule.reads(cfg):
            continue
        if OmegaConf.select(cfg, key) != OmegaConf.select(defaults, key):
            raise ConfigError(key, f"is only read when {rule.condition} (here {rule.context(cfg)}); remove it or "
                                   f"set what reads it")
