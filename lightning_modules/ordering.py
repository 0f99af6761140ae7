"""Orderings: the only per-method code in roar, as plain objects (no Lightning).

An ordering says how one model sees an image as a sequence. It lays out the teacher-forced training sequence,
plans the decode order and step sizes, and lays out each cached decode step, all over the ``Seq`` seam
(lightning_modules/nn/sequence.py). The backbone, ``ARModule`` (training), ``sampling.generate`` (the one
sampling loop), the callbacks and the CLIs only call these methods and read ``capabilities``; none of them
branches on a method name. Adding an ordering is one file (a subclass of ``Ordering`` plus its thin
LightningModule binding) and one line in ``lightning_modules/variants.py``.

    ordering = RandAROrdering(grid=(16, 16), max_steps=..., model=ModelConfig(...))
    seq, targets = ordering.train_inputs(codes [B,N], labels [B], step, generator)   # targets [B, N] decode order
    plan = ordering.decode_plan(B, num_steps, schedule, generator, known, order, device)
    seq = ordering.decode_step(state, n)                                              # one cached forward
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lightning_modules.hparams import ModelConfig
from lightning_modules.nn.sequence import Seq
from lightning_modules.order_policies import ORDER_POLICIES
from lightning_modules.sampling import DecodePlan, DecodeState
from lightning_modules.schedules import STEP_SCHEDULES, step_counts

COUNT_SCHEDULES = tuple(STEP_SCHEDULES)  # how many tokens each step decodes (lightning_modules/schedules.py)
ANY_ORDER_SCHEDULES = (*COUNT_SCHEDULES, *ORDER_POLICIES)  # ... plus where (lightning_modules/order_policies.py)


@dataclass(frozen=True)
class Capabilities:
    """What an ordering can do; the config validator, the CLIs, editing and the sweeps read only this."""

    any_order: bool = False  # decodes in an order drawn at sampling time: known positions first (true inpainting),
    #                          order policies (sample.schedule=locality|halton) and explicit orders apply
    parallel: bool = False  # a step may decode several tokens (sample.num_steps < N)
    per_sample_orders: bool = True  # each sample its own decode order (False: one order per batch, ARPG)
    flavours: tuple = ("llama",)  # backbone flavours it runs on (lightning_modules/backbones.py)
    schedules: tuple = ("one_per_step",)  # sample.schedule values it accepts


def random_orders(batch: int, n: int, generator, device, per_sample: bool = True) -> torch.Tensor:
    """Seeded random permutations long [B, N] (one per sample, or one shared by the batch)."""
    if per_sample:
        return torch.rand(batch, n, generator=generator, device=device).argsort(-1)
    return torch.rand(n, generator=generator, device=device).argsort().expand(batch, -1)


def known_first(order: torch.Tensor, known) -> tuple[torch.Tensor, int]:
    """Stable-partition each row of ``order`` so known positions come first; known = (mask bool [N], tokens)."""
    if known is None:
        return order, 0
    mask = known[0].to(order.device)
    is_known = mask[order].long()  # [B, N]
    # argsort of (1 - is_known) with a stable sort keeps the drawn order within each group
    idx = torch.sort(1 - is_known, dim=1, stable=True).indices
    return torch.gather(order, 1, idx), int(mask.sum())


class Ordering:
    """Base class. Subclasses set the class attributes and implement ``train_inputs``, ``decode_plan`` (or use
    ``AnyOrder``'s) and ``decode_step``; the rest has defaults."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    default_sample: ClassVar[dict] = dict(schedule="one_per_step", cfg_schedule="constant")
    cfg_counts_current_step: ClassVar[bool] = False  # CFG ramps on the count decoded before the step (not ARPG)
    reads: ClassVar[tuple[str, ...]] = ()  # ordering-specific model.* keys it reads (others must stay default)

    def __init__(self, grid: tuple[int, int], max_steps: int = 1000, model: ModelConfig | None = None):
        self.grid = tuple(int(g) for g in grid)
        self.max_steps = int(max_steps)
        self.model = model or ModelConfig()

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]

    # ------------------------------------------------------------------ what the backbone must offer
    def backbone_options(self, dims: dict) -> dict:
        """Backbone features the ordering needs (``position_tokens``, ``target_aware``, ``cross_layers``)."""
        return {}

    # ------------------------------------------------------------------ training
    def train_order(self, batch: int, step: int, generator, device=None) -> torch.Tensor:
        """long [B, N]: the decode order of each training sample at ``step`` (raster index decoded i-th)."""
        raise NotImplementedError

    def train_inputs(self, codes: torch.Tensor, labels: torch.Tensor, step: int, generator,
                     order: torch.Tensor | None = None) -> tuple[Seq, torch.Tensor]:
        """codes long [B, N] raster -> (Seq, targets long [B, N] in decode order). ``order`` [B, N] (optional)
        fixes the decode order (cross-order evaluation, tests, parity); otherwise the ordering draws it."""
        raise NotImplementedError

    def eval_order(self, name: str, batch: int, generator, device=None) -> torch.Tensor:
        """long [B, N] for cross-order evaluation: ``own`` (the order it validates in: the end of its training
        schedule), ``random`` (a fresh permutation per sample) or any scan of lightning_modules/scans.py."""
        if name == "own":
            return self.train_order(batch, self.max_steps, generator, device)
        if name == "random":
            return random_orders(batch, self.num_positions, generator, device)
        from lightning_modules.scans import scan_order

        return scan_order(name, self.grid).to(device).expand(batch, -1)

    def train_logs(self, step: int) -> dict[str, float]:
        """Scalars worth logging at a training step (RAR: its permutation probability)."""
        return {}

    # ------------------------------------------------------------------ decoding
    def decode_plan(self, batch: int, num_steps: int, schedule: str, generator, known=None, order=None,
                    device=None) -> DecodePlan:
        raise NotImplementedError

    def decode_step(self, state: DecodeState, n: int) -> Seq:
        """The new slots of one cached forward. Read ``state.tokens`` only by indexing (copy its values into
        ``ids``, never branch on them): the fast decode path (lightning_modules/fast_decode.py) calls this once
        per step at plan time with order indices in place of tokens, and gathers the real tokens in the loop."""
        raise NotImplementedError

    def cache_length(self, num_positions: int) -> int:
        return num_positions + 1

    def default_num_steps(self, num_positions: int) -> int:
        return num_positions

    def headline_steps(self, num_positions: int) -> list[int]:
        """Decode-step counts the papers report for this ordering (benchmarks time these), scaled to the grid."""
        return [self.default_num_steps(num_positions)]


class AnyOrder(Ordering):
    """Shared decode planning of the orderings that decode in any order (RandAR, ARPG, the sigma-GPT arm): a
    random order (per sample or per batch), known positions first, or an order policy from ``sample.schedule``
    (locality, halton) with the counts of the ordering's default schedule."""

    def train_order(self, batch, step, generator, device=None):
        return random_orders(batch, self.num_positions, generator, device)  # one per sample, every step

    def decode_plan(self, batch, num_steps, schedule, generator, known=None, order=None, device=None):
        per_sample = self.capabilities.per_sample_orders
        if schedule in ORDER_POLICIES:
            return ORDER_POLICIES[schedule](self, batch, num_steps, generator, known, order, per_sample, device)
        if order is None:
            order = random_orders(batch, self.num_positions, generator, device, per_sample)
        order, k = known_first(order, known)
        return DecodePlan(order=order, counts=step_counts(schedule, self.num_positions - k, num_steps), num_known=k)
