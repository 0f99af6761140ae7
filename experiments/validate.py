"""Value checks for a merged ExperimentConfig: each failure is a ConfigError naming the dotted key.

Types, unknown keys and fixed choices (``Literal`` fields: trainer.strategy, sample.mode, ...) are already enforced
by OmegaConf's structured merge; this adds ranges, the choices a registry decides (orderings, scans, tokenizers,
schedules) and impossible combinations (e.g. a global batch that does not divide over the world size).
"""
from __future__ import annotations

from omegaconf import DictConfig

from experiments.config import ConfigError, ModelConfig


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _choice(value, choices, key: str) -> None:
    _check(value in choices, key, f"{value!r} is not one of {list(choices)}")


def _unit(value: float, key: str, closed_top: bool = False) -> None:
    top_ok = value <= 1 if closed_top else value < 1
    _check(0 <= value and top_ok, key, f"{value} must be in [0, 1{']' if closed_top else ')'}")


# sample.* ranges: (key, ok, what a good value is). One table for the training config, experiments.sample and
# experiments.edit, so a value training refuses is never written into a sample file name or sampled with.
SAMPLE_RANGES = (
    ("num_steps", lambda v: v >= 0, "must be >= 0 (0 = the ordering's default)"),
    ("cfg_scale", lambda v: v >= 0, "must be >= 0"),
    ("cfg_power", lambda v: v >= 0, "must be >= 0"),
    ("temperature", lambda v: v > 0, "must be > 0"),
    ("top_k", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
)


def validate_sample_ranges(sample) -> None:
    """ConfigError naming the first sample.* value out of range; ``sample``: the config's section or a CLI's
    overrides dict (keys it lacks are skipped: they keep the checkpoint's checked defaults)."""
    for key, ok, what in SAMPLE_RANGES:
        if key in sample:
            _check(ok(sample[key]), f"sample.{key}", f"{sample[key]} {what}")


def validate_ordering(cfg: DictConfig):
    """model.variant / model.flavour / the ordering's own model.* keys, against the registry and the ordering's
    declared capabilities; returns the ordering class."""
    from lightning_modules.variants import ordering_class, registry

    m = cfg.model
    names = list(registry())
    _choice(m.variant, names, "model.variant")
    try:
        ordering = ordering_class(m.variant)
    except ValueError as err:
        raise ConfigError("model.variant", str(err).split(": ", 1)[-1]) from None
    if "scan" in ordering.reads:
        from lightning_modules.scans import SCANS

        _choice(m.scan, SCANS, "model.scan")
        _check(m.scan_seed >= 0, "model.scan_seed", f"{m.scan_seed} must be >= 0")
    flavours = ordering.capabilities.flavours
    _check(m.flavour in flavours, "model.flavour",
           f"the {m.variant} ordering runs on {list(flavours)}, not {m.flavour!r}")
    # an ordering-specific key the chosen ordering never reads is an error, not silently ignored
    defaults = ModelConfig()
    for name in names:
        for key in ordering_class(name).reads:
            if key not in ordering.reads and m[key] != getattr(defaults, key):
                readers = [n for n in names if key in ordering_class(n).reads]
                raise ConfigError(f"model.{key}", f"is only read by the {readers} ordering(s), not by "
                                                  f"model.variant={m.variant}")
    return ordering


def validate(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from tokenizers.registry import TOKENIZERS, check_options

    m, t, o, s, d = cfg.model, cfg.trainer, cfg.optim, cfg.sample, cfg.data
    ordering = validate_ordering(cfg)
    for key in ("dim", "n_layer", "n_head", "ffn_hidden"):
        _check(m[key] >= 0, f"model.{key}", f"{m[key]} must be >= 0 (0 = from model.size)")
    if m.dim and m.n_head:
        _check(m.dim % m.n_head == 0 and (m.dim // m.n_head) % 4 == 0, "model.dim",
               f"{m.dim} must split into model.n_head={m.n_head} heads of a size divisible by 4")
    _check(m.num_classes >= 1, "model.num_classes", f"{m.num_classes} must be >= 1")
    _unit(m.class_dropout, "model.class_dropout")
    for key in ("token_dropout", "resid_dropout", "ffn_dropout"):
        _unit(m.llama[key], f"model.llama.{key}")
    for key in ("dropout", "attn_dropout"):
        _unit(m.rar_vit[key], f"model.rar_vit.{key}")
    _check(m.llama.norm_eps > 0, "model.llama.norm_eps", f"{m.llama.norm_eps} must be > 0")
    _check(m.llama.rope_base > 1, "model.llama.rope_base", f"{m.llama.rope_base} must be > 1")
    _choice(m.llama.class_rope, ("zero", "identity"), "model.llama.class_rope")
    _unit(m.rar_anneal_start, "model.rar_anneal_start", closed_top=True)
    _unit(m.rar_anneal_end, "model.rar_anneal_end", closed_top=True)
    _check(m.rar_anneal_start <= m.rar_anneal_end, "model.rar_anneal_end",
           f"{m.rar_anneal_end} must be >= model.rar_anneal_start={m.rar_anneal_start}")

    _choice(cfg.tokenizer.kind, TOKENIZERS, "tokenizer.kind")
    _check(2 <= cfg.tokenizer.levels <= 256, "tokenizer.levels", f"{cfg.tokenizer.levels} must be in [2, 256]")
    _check(cfg.tokenizer.vocab_size >= 0, "tokenizer.vocab_size", f"{cfg.tokenizer.vocab_size} must be >= 0")
    if cfg.tokenizer.kind == "codes":
        _check(cfg.tokenizer.vocab_size >= 2, "tokenizer.vocab_size", "tokenizer.kind=codes needs vocab_size >= 2")
    try:  # an option the tokenizer's factory does not take: refused here, not as a TypeError at build time
        check_options(cfg.tokenizer.kind, **OmegaConf.to_container(cfg.tokenizer.options))
    except ValueError as err:
        key, _, message = str(err).partition(": ")
        raise ConfigError(key, message) from None

    _check(d.image_size >= 1, "data.image_size", f"{d.image_size} must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", f"{d.num_workers} must be >= 0")
    _check(d.samples_per_epoch >= 0, "data.samples_per_epoch", f"{d.samples_per_epoch} must be >= 0")
    if d.kind == "images":
        _check(bool(d.train_shards), "data.train_shards", "data.kind=images needs shard paths")
    if d.kind == "codes":
        _check(bool(d.code_dir or d.train_shards), "data.code_dir", "data.kind=codes needs the code-shard folder")

    _check(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"{list(o.betas)} must be two numbers in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"{o.weight_decay} must be >= 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"{o.warmup_steps} must be >= 0")
    _unit(o.min_lr_ratio, "optim.min_lr_ratio", closed_top=True)
    _check(o.grad_clip >= 0, "optim.grad_clip", f"{o.grad_clip} must be >= 0 (0 = off)")
    _check(o.max_nonfinite_in_a_row >= 1, "optim.max_nonfinite_in_a_row", f"{o.max_nonfinite_in_a_row} must be >= 1")

    _check(t.max_steps >= 1, "trainer.max_steps", f"{t.max_steps} must be >= 1")
    if o.warmup_steps >= 1:  # below 1 a fraction of max_steps, from 1 a step count (lightning_modules/base.py)
        _check(float(o.warmup_steps).is_integer(), "optim.warmup_steps",
               f"{o.warmup_steps} must be a fraction of trainer.max_steps (< 1) or a whole number of steps")
        _check(o.warmup_steps <= t.max_steps, "optim.warmup_steps",
               f"{o.warmup_steps} steps exceed trainer.max_steps={t.max_steps}")
    _check(t.global_batch_size >= 1, "trainer.global_batch_size", f"{t.global_batch_size} must be >= 1")
    _check(t.devices >= 1, "trainer.devices", f"{t.devices} must be >= 1")
    _check(t.num_nodes >= 1, "trainer.num_nodes", f"{t.num_nodes} must be >= 1")
    world = t.devices * t.num_nodes
    _check(t.global_batch_size % world == 0, "trainer.global_batch_size",
           f"{t.global_batch_size} is not divisible by the world size {world} (devices x num_nodes)")
    _check(t.micro_batch_size >= 0, "trainer.micro_batch_size", f"{t.micro_batch_size} must be >= 0")
    if t.micro_batch_size:
        per_device = t.global_batch_size // world
        _check(per_device % t.micro_batch_size == 0, "trainer.micro_batch_size",
               f"{t.micro_batch_size} does not divide the per-device batch {per_device}")
    for key in ("val_every_steps", "log_every_steps", "ckpt_every_steps"):
        _check(t[key] >= 1, f"trainer.{key}", f"{t[key]} must be >= 1")
    _check(t.limit_val_batches >= 0, "trainer.limit_val_batches", f"{t.limit_val_batches} must be >= 0")
    if d.samples_per_epoch:  # each rank's loader workers split an epoch; each must yield one whole micro-batch
        workers = max(1, d.num_workers)
        micro = t.micro_batch_size or t.global_batch_size // world
        _check(d.samples_per_epoch // (world * workers) >= micro, "data.samples_per_epoch",
               f"{d.samples_per_epoch} is less than one micro-batch of {micro} per loader worker ({world} ranks x "
               f"{workers} workers)")
    _check(t.collective_timeout_s > 0, "trainer.collective_timeout_s", f"{t.collective_timeout_s} must be > 0 seconds")
    _check(t.stop_grace_s > 0, "trainer.stop_grace_s", f"{t.stop_grace_s} must be > 0 seconds")

    validate_sample_ranges(s)
    _check(s.schedule in ("", *ordering.capabilities.schedules), "sample.schedule",
           f"{s.schedule!r} is not a schedule the {m.variant} ordering decodes with (it takes "
           f"{list(ordering.capabilities.schedules)})")
    if "onednn" in (s.kernels, t.kernels):  # refused before training, not at the first step or sampling callback
        import torch

        from experiments.strategies import on_gpu
        from lightning_modules.nn.onednn import unavailable
        from lightning_modules.sampling import PRECISIONS

        device = "cuda" if on_gpu(cfg) else "cpu"
        for key, kernels, dtype in (("sample.kernels", s.kernels, PRECISIONS[s.precision or "fp32"]),
                                    ("trainer.kernels", t.kernels, torch.float32)):  # training linears are fp32
            why = unavailable(device, dtype) if kernels == "onednn" else None
            _check(why is None, key, f"onednn cannot run here: {why}")
        if t.kernels == "onednn":
            _check(t.precision in ("32-true", "32"), "trainer.kernels",
                   f"onednn runs the fp32 linears of trainer.precision=32-true; under {t.precision} the linears "
                   "are torch's (on a CPU its bf16 linear is oneDNN already): use trainer.kernels=auto or aten")

    c = cfg.callbacks
    _unit(c.ema_decay, "callbacks.ema_decay")
    for key in ("sample_every_steps", "order_map_every_steps"):
        _check(c[key] >= 0, f"callbacks.{key}", f"{c[key]} must be >= 0 (0 = off)")
    _check(c.sample_per_class >= 1, "callbacks.sample_per_class", f"{c.sample_per_class} must be >= 1")
    _check(all(0 <= k < m.num_classes for k in c.sample_classes), "callbacks.sample_classes",
           f"{list(c.sample_classes)} must be class ids in [0, model.num_classes={m.num_classes})")

    e = cfg.eval
    _check(e.fid_every_steps >= 0, "eval.fid_every_steps", f"{e.fid_every_steps} must be >= 0")
    _check(e.fid_num_samples >= 0, "eval.fid_num_samples", f"{e.fid_num_samples} must be >= 0")
    if e.fid_num_samples and e.extractor == "shards":
        _check(bool(e.extractor_weights), "eval.extractor_weights", "eval.extractor=shards needs the extractor trained "
               "on your shards (python -m experiments.train_extractor --shards ... --out FILE)")
    if e.fid_num_samples and e.extractor == "inception":
        _check(bool(e.inception_weights), "eval.inception_weights",
               "FID with the Inception extractor needs a local weights file (nothing is downloaded)")
    _check(cfg.seed >= 0, "seed", f"{cfg.seed} must be >= 0")
    from experiments.config import ExperimentConfig
    from experiments.readers import check_unread

    check_unread(cfg, OmegaConf.structured(ExperimentConfig))  # a key nothing reads in this run is an error
    _check(cfg.resume in ("auto", "never") or cfg.resume.endswith((".ckpt", ".pt")) or "/" in cfg.resume,
           "resume", f"{cfg.resume!r} must be auto, never or a checkpoint path")
