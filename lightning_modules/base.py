"""ARModule: the one training module. It owns loss, optimiser groups, LR schedule, val NLL and the sampling entry
point, and takes an ordering (lightning_modules/ordering.py: a plain object, the only per-method code).

Each training variant is a thin binding in its ordering's file (``class RARModule(ARModule): ordering_class =
RAROrdering``), registered in lightning_modules/variants.py. Settings arrive as plain dicts (recorded by
save_hyperparameters, so checkpoints stay readable with weights_only=True) and are turned into the typed
dataclasses of lightning_modules/hparams.py, the same ones experiments/config.py composes: one set of defaults.
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lightning_modules.backbones import build_backbone, resolve_size
from lightning_modules.hparams import (SAMPLE_DEFAULTED, ModelConfig, OptimConfig, SampleConfig, normalize_model,
                                       plain, typed)
from lightning_modules.nn import onednn
from lightning_modules.resumable import STEP_RNG_SALT, step_rng
from lightning_modules.sampling import PRECISIONS, SampleSettings, generate
from tokenizers.base import TokenizerMismatchError
from tokenizers.registry import build_tokenizer

ORDER_QUARTERS = 4  # val/nll_by_order_q1..q4: NLL of the first .. last quarter of the tokens in decode order


class NonFiniteLossError(RuntimeError):
    """optim.max_nonfinite_in_a_row non-finite losses in a row; the one-line message names the count and key."""


# Our own mixer, not Lightning's seed_everything (seeds global state once per process) nor hash() of a tuple (not
# promised stable across versions): every random order needs a pure, portable function of (seed, rank, step).
def derive_seed(*parts: int) -> int:
    """Mix integers (seed, rank, step, salt...) into one 63-bit seed; stable across runs and platforms."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def make_generator(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class ARModule(L.LightningModule):
    ordering_class = None  # set by each variant's binding (see lightning_modules/variants.py)

    def __init__(self, model: dict, tokenizer: dict, optim: dict | None = None, sample: dict | None = None,
                 seed: int = 0, max_steps: int = 1000, grid: tuple[int, int] | list | None = None,
                 compile: bool = False, cpu_adam: bool = False, fused_adam: bool = False, kernels: str = "auto"):
        """model: ModelConfig fields (+ ``grid`` unless given separately); optim: OptimConfig fields; sample:
        SampleConfig fields (empty = the ordering's default); compile: torch.compile the training forward
        (trainer.compile); cpu_adam: DeepSpeed's CPU Adam (ZeRO-Offload); fused_adam: AdamW(fused=True);
        kernels: the training linears' kernels (trainer.kernels: auto | aten | onednn, nn/onednn.py)."""
        super().__init__()
        model, recorded_grid = normalize_model(model)
        self.model_cfg = typed(ModelConfig, model, "model")
        self.optim_cfg = typed(OptimConfig, optim, "optim")
        self.sample_cfg = typed(SampleConfig, sample, "sample")
        self.grid = tuple(int(g) for g in (grid or recorded_grid))
        self.save_hyperparameters({"model": {**plain(self.model_cfg), "grid": list(self.grid)},
                                   "tokenizer": tokenizer, "optim": plain(self.optim_cfg),
                                   "sample": plain(self.sample_cfg), "seed": seed, "max_steps": max_steps})
        self.ordering = self.ordering_class(self.grid, max_steps=max_steps, model=self.model_cfg)
        tok = build_tokenizer(**tokenizer["build"])
        self._tokenizer = [tok]  # a list: frozen, not a submodule, never in our checkpoints (fingerprint is)
        self.tokenizer_fingerprint = tok.fingerprint
        m = self.model_cfg
        dims = resolve_size(m.flavour, m.size, dim=m.dim, n_layer=m.n_layer, n_head=m.n_head, ffn_hidden=m.ffn_hidden)
        options = {**plain(getattr(m, m.flavour)), "grad_checkpointing": m.grad_checkpointing}
        options.update(self.ordering.backbone_options(dims))
        self.backbone = build_backbone(m.flavour, vocab_size=tok.vocab_size, num_classes=m.num_classes,
                                       grid=self.grid, **dims, **options)
        # built on the CPU; OneDnnLinear itself falls back to torch's linear wherever else it later runs
        threshold = onednn.kernel_threshold(kernels, "cpu", torch.float32, "trainer.kernels")
        self.onednn_linears = 0 if threshold is None else onednn.use_for_training(self.backbone, threshold)
        s = plain(self.sample_cfg)
        self.sample_defaults = {**self.ordering.default_sample,
                                **{k: v for k, v in s.items() if k not in SAMPLE_DEFAULTED or v not in ("", 0)}}
        self.compile, self.cpu_adam, self.fused_adam = compile, cpu_adam, fused_adam
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self._step_nonfinite = False  # a micro-batch of the current optimizer step had a non-finite loss
        # val/nll and its order quarters as sample-weighted means that torchmetrics sums across ranks (float sum
        # and count): exact for any split of the val set. Lightning's sync_dist mean averages an integer count
        # per rank (359 samples on 2 ranks -> 179), off by up to 1/count. States are not in the state_dict.
        # nan_strategy=nan: a NaN loss makes the mean NaN, as before ("disable" drops the weights: torchmetrics 1.9)
        self.val_nll = torch.nn.ModuleDict({k: MeanMetric(nan_strategy=float("nan"))
                                            for k in ["all", *(f"q{q + 1}" for q in range(ORDER_QUARTERS))]})
        self.last_val_step = -1
        self._grad_norm_step = 0  # DeepSpeed: the engine step whose grad norm was last logged
        self._compiled = None  # [torch.compile(backbone)] when compile; a list keeps it out of state_dict
        self.compile_backend = "inductor"  # the bench's --dry-run sets "eager": the same capture, no codegen

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self):
        tok = self._tokenizer[0]
        if next(iter(tok.buffers()), None) is not None or next(iter(tok.parameters()), None) is not None:
            tok.to(self.device)
        return tok

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        """Seeded from (seed, rank, step, micro): every random order is reproducible and differs across ranks and
        across the micro-batches of one accumulated step (``micro``: the index within it; 0 without accumulation,
        which is the seed runs have always had)."""
        return make_generator(derive_seed(self.hparams.seed, self.global_rank, step, micro), self.device)

    def codes_from_batch(self, batch: dict) -> torch.Tensor:
        """Batch contract: {"codes": long [B,h,w]} or {"image": uint8 [B,3,H,W]}, plus "label" -> codes [B, N]."""
        codes = batch["codes"] if "codes" in batch else self.tokenizer.encode(batch["image"])
        if tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"data: code grid {tuple(codes.shape[1:])} does not match model.grid {self.grid}")
        return codes.reshape(codes.shape[0], -1).long()

    def drop_classes(self, labels: torch.Tensor, generator) -> torch.Tensor:
        p = self.model_cfg.class_dropout
        if p <= 0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
        return torch.where(drop, torch.full_like(labels, self.backbone.num_classes), labels)

    def configure_model(self) -> None:
        """trainer.compile (``compile``, set by experiments/build.py): compile the backbone for the training
        forward only. Sampling and validation stay eager: decode steps change shape every step, and compiling
        them would recompile instead of helping. nn.Module is wrapped, not replaced, so state_dict keys stay."""
        if self.compile and self._compiled is None:
            self._compiled = [torch.compile(self.backbone, backend=self.compile_backend)]

    def logits_on(self, codes, labels, step: int, generator, order=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced forward -> (logits [B, N, V], targets [B, N]), both in the ordering's decode order."""
        seq, targets = self.ordering.train_inputs(codes, labels, step, generator, order=order)
        forward = self._compiled[0] if self._compiled is not None and self.training else self.backbone
        return forward(seq), targets

    def loss_on(self, codes, labels, step: int, generator) -> torch.Tensor:
        logits, targets = self.logits_on(codes, labels, step, generator)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def token_nll(self, codes, labels, generator, order=None, step: int | None = None) -> torch.Tensor:
        """NLL in nats per token, float [B, N], column i = the token decoded i-th (``order`` [B, N] or the
        ordering's own order at ``step``, default the end of training: what validation measures)."""
        step = self.hparams.max_steps if step is None else step
        logits, targets = self.logits_on(codes, labels, step, generator, order)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        step = self.global_step
        # the micro-batch's place in its accumulation window, as Lightning counts it (its zero_grad runs at 0);
        # checkpoints are taken at step boundaries, so a resumed run counts the same
        micro = batch_idx % self.trainer.accumulate_grad_batches
        if micro == 0:
            self._step_nonfinite = False
        if self._step_nonfinite:  # the step is skipped as a whole; every rank knows (the flag below is reduced)
            self.log("train/nonfinite_skipped", float(self.nonfinite_total))
            return None
        g = self.generator(step, micro)
        codes = self.codes_from_batch(batch)
        # dropout from a generator seeded by (step, micro-batch): a resumed run draws the masks an uninterrupted
        # one would (Lightning does not checkpoint the global RNG; lightning_modules/resumable.py)
        with step_rng(derive_seed(self.hparams.seed, self.global_rank, step, batch_idx, STEP_RNG_SALT), self.device):
            loss = self.loss_on(codes, self.drop_classes(batch["label"], g), step, g)
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:  # every rank must skip together, or DDP hangs
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if finite.item() < 1:
            return self.skip_nonfinite(step)
        self.log("train/nonfinite_skipped", float(self.nonfinite_total))  # every step: a running total in TB
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        for key, value in self.ordering.train_logs(step).items():
            self.log(key, value)
        return loss

    def skip_nonfinite(self, step: int):
        """Once per optimizer step: its first non-finite micro-batch marks the whole step skipped."""
        self._step_nonfinite = True
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_total))
        limit = self.optim_cfg.max_nonfinite_in_a_row
        if self.nonfinite_streak >= limit:
            raise NonFiniteLossError(f"train: {self.nonfinite_streak} non-finite losses in a row (last at step "
                                     f"{step}) reached optim.max_nonfinite_in_a_row={limit}; stopping: lower optim.lr "
                                     f"or check the data")
        return None  # Lightning skips this backward; the step's other gradients go in on_before_optimizer_step

    def on_before_optimizer_step(self, optimizer):
        if self._step_nonfinite:
            # drop the gradients the step's finite micro-batches accumulated: AdamW then skips every parameter
            # (no gradient), so weights and moments stay bit-identical, as without accumulation (where none exist)
            optimizer.zero_grad(set_to_none=True)
            return
        self.nonfinite_streak = 0  # a whole step trained: the streak counts skipped steps in a row
        # train/grad_norm: the global 2-norm of the (rank-averaged, unclipped) gradient, under every strategy
        if self._deepspeed_engine() is not None:
            return  # ZeRO partitions the gradients (p.grad is None): the engine's norm is logged after its step
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def _deepspeed_engine(self):
        """The DeepSpeed engine training this module, or None under any other strategy."""
        engine = getattr(self._trainer.strategy, "deepspeed_engine", None) if self._trainer is not None else None
        return engine if hasattr(engine, "get_global_grad_norm") else None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        engine = self._deepspeed_engine()
        # Lightning calls DeepSpeed's step every micro-batch; the engine steps (and computes the norm of the whole,
        # partitioned gradient before clipping, as DDP's above) only at an accumulation boundary
        if engine is None or engine.global_steps == self._grad_norm_step:
            return
        self._grad_norm_step = engine.global_steps
        norm = engine.get_global_grad_norm()  # None only with zero_optimization.compute_grad_norm=false
        if norm is not None:
            self.log("train/grad_norm", float(norm))

    def validation_step(self, batch, batch_idx):
        # Val NLL under the order distribution the variant *samples* with (end of its training schedule),
        # with a generator fixed per batch so every evaluation of every run sees the same orders.
        g = make_generator(derive_seed(self.hparams.seed, 7, batch_idx, self.global_rank), self.device)
        codes = self.codes_from_batch(batch)
        logits, targets = self.logits_on(codes, batch["label"], self.hparams.max_steps, g)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        B = codes.shape[0]
        self.val_nll["all"].update(loss / math.log(2), B)
        self.log("val/nll", self.val_nll["all"], prog_bar=True)  # computed (and synced) at the epoch's end
        # NLL by position in the generation order: quarter q of the tokens decoded (q1 = the first, least context)
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        for q, part in enumerate(per_token.tensor_split(ORDER_QUARTERS, dim=1)):
            metric = self.val_nll[f"q{q + 1}"]
            metric.update(part.mean() / math.log(2), B)
            self.log(f"val/nll_by_order_q{q + 1}", metric)
        return loss

    def on_validation_epoch_end(self):
        self.last_val_step = self.global_step  # train.run validates once more when the last step had none

    def configure_optimizers(self):
        o = self.optim_cfg
        no_decay_names = tuple(o.no_decay_names)
        decay, no_decay = [], []
        for name, p in self.backbone.named_parameters():
            if not p.requires_grad:
                continue
            # decay on >= 2-D tensors (matmuls, embeddings, RandAR's [1, d] position vector) unless named out
            (decay if p.ndim >= 2 and not any(s in name for s in no_decay_names) else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        lr, betas = o.lr, tuple(o.betas)
        if self.cpu_adam:  # ZeRO-Offload (experiments/strategies.py): the same AdamW, as DeepSpeed's CPU kernel
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=1e-8, adamw_mode=True)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=self.fused_adam or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_multiplier)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # a pure function of the step inside torch's LambdaLR, not a chain of torch schedulers: nothing to replay on resume
    def lr_multiplier(self, step: int) -> float:
        """Linear warmup, then constant or cosine down to ``min_lr_ratio`` (a pure function of the step)."""
        o, total = self.optim_cfg, max(1, self.hparams.max_steps)
        warmup = o.warmup_steps
        warmup = int(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)
        if warmup and step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = o.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    # ------------------------------------------------------------------ sampling
    def sample_settings(self, **overrides) -> SampleSettings:
        s = {**self.sample_defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if not s.get("num_steps"):
            s["num_steps"] = self.ordering.default_num_steps(self.num_positions)
        fields = SampleSettings.__dataclass_fields__
        return SampleSettings(**{k: v for k, v in s.items() if k in fields})

    def checked_sample_settings(self, **overrides) -> SampleSettings:
        """sample_settings(), refused with one ValueError line naming the sample.* key when the ordering cannot
        decode with them (e.g. sample.num_steps=8 for a one-token-per-step ordering), before any sampling."""
        s = self.sample_settings(**overrides)
        probe = make_generator(0, self.device)
        try:
            self.ordering.decode_plan(1, s.num_steps, s.schedule, probe, device=self.device)
            dtype = PRECISIONS.get(s.precision, torch.float32)
            onednn.kernel_threshold(s.kernels, self.device, dtype, "sample.kernels")  # onednn on a GPU
        except ValueError as err:
            msg = str(err).splitlines()[0]
            raise ValueError(msg if msg.startswith("sample.") else f"sample: {msg}") from None
        if not self.ordering.capabilities.parallel and s.num_steps != self.num_positions:
            raise ValueError(f"sample.num_steps: {self.model_cfg.variant} decodes one token per step, so it needs "
                             f"{self.num_positions} steps (0 = that default), got {s.num_steps}")
        return s

    @torch.no_grad()
    def sample_codes(self, labels: torch.Tensor, seed: int, **overrides) -> torch.Tensor:
        """Codes long [B, h, w] for ``labels``, deterministic given (labels, seed, settings)."""
        labels = labels.to(self.device)
        codes = generate(self, labels, self.sample_settings(**overrides), make_generator(seed, self.device))
        return codes.view(-1, *self.grid)

    @torch.no_grad()
    def sample_images(self, labels: torch.Tensor, seed: int, **overrides) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return self.tokenizer.decode(self.sample_codes(labels, seed, **overrides))  # uint8 [B, 3, H, W]
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["roar"] = {"tokenizer_fingerprint": self.tokenizer_fingerprint,
                              "vocab_size": self.backbone.vocab_size, "variant": self.model_cfg.variant,
                              "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before loading the weights: a mismatch is named here, not as a shape error later
        meta = checkpoint.get("roar", {})
        fingerprint = meta.get("tokenizer_fingerprint", self.tokenizer_fingerprint)
        vocab = meta.get("vocab_size", self.backbone.vocab_size)
        if fingerprint != self.tokenizer_fingerprint or vocab != self.backbone.vocab_size:
            raise TokenizerMismatchError(
                f"checkpoint: made with tokenizer fingerprint {fingerprint} (vocabulary {vocab}); the configured "
                f"tokenizer is {self.tokenizer_fingerprint} (vocabulary {self.backbone.vocab_size})")
        self.nonfinite_total = meta.get("nonfinite_total", 0)
        self.nonfinite_streak = meta.get("nonfinite_streak", 0)
