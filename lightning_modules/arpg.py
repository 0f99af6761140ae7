"""ARPG: autoregressive parallel generation with position-only queries (Li et al., arXiv 2503.10568).

Training (docs/methods/randar_arpg.md §2.2), per-sample random order sigma:
    content stream (self layers, causal):  [class, x_s0, ..., x_s(N-2)]   RoPE of each token's own position
    query stream (cross layers):           N x [MASK], query j carries RoPE(s_j) — its target's position
Query j reads the shared K/V of content slots 0..j (class + the tokens before its target); queries never see
each other. Loss on all N queries. Decoding (§2.3): one order for the whole batch; each step appends the tokens
decoded last to the content cache and asks n_t queries against it (append-only cache). Official mode: the
content fed in one step attends with no mask at all (bidirectionally, as released); consistent mode: causally,
so every query's context equals a training context. CFG ramps on the count *including* the step.
"""
from __future__ import annotations

import torch

from lightning_modules.base import ARModule
from lightning_modules.nn.sequence import SLOT_CLASS, SLOT_IMAGE, Seq
from lightning_modules.ordering import ANY_ORDER_SCHEDULES, AnyOrder, Capabilities
from lightning_modules.raster import next_token_inputs


class ARPGOrdering(AnyOrder):
    capabilities = Capabilities(any_order=True, parallel=True, per_sample_orders=False,
                                schedules=ANY_ORDER_SCHEDULES)
    default_sample = dict(schedule="arccos", cfg_schedule="linear")
    cfg_counts_current_step = True

    def backbone_options(self, dims):
        return {"cross_layers": dims["n_layer"] // 2}

    def default_num_steps(self, num_positions):
        return max(1, num_positions // 4)  # the official 64 of 256

    def headline_steps(self, num_positions):
        return [max(1, round(k * num_positions / 256)) for k in (64, 32)]  # the paper's 64- and 32-step rows

    def train_inputs(self, codes, labels, step, generator, order=None):
        B, N = codes.shape
        if order is None:
            order = self.train_order(B, step, generator, codes.device)
        seq, x = next_token_inputs(codes, labels, order)  # the content stream is the next-token sequence
        seq.target = None
        seq.query_pos = order  # query j predicts s_j
        seq.query_mask = torch.ones(N, N, dtype=torch.bool, device=codes.device).tril()[None, None]
        return seq, x

    def decode_step(self, state, n):
        order, dev = state.order, state.order.device
        B2 = order.shape[0]
        fed = torch.arange(state.fed, state.done, device=dev)
        kind = torch.full((B2, len(fed)), SLOT_IMAGE, dtype=torch.long, device=dev)
        ids, pos, rows = state.tokens[:, fed], order[:, fed], fed + 1
        if state.first:
            one = torch.zeros(B2, 1, dtype=torch.long, device=dev)
            kind, ids = torch.cat([one + SLOT_CLASS, kind], 1), torch.cat([one, ids], 1)
            pos = torch.cat([one - 1, pos], 1)
            rows = torch.cat([rows.new_zeros(1), rows])
        mask = None  # consistent: causal over rows, as in training
        if state.mode == "official":  # released sampler: no mask at all in the self layers
            mask = torch.ones(1, 1, rows.shape[0], int(rows.max()) + 1, dtype=torch.bool, device=dev)
        return Seq(kind=kind, ids=ids, pos=pos, labels=state.labels, rows=rows, mask=mask,
                   query_pos=order[:, state.done: state.done + n])


class ARPGModule(ARModule):
    ordering_class = ARPGOrdering
