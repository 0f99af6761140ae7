"""RandAR: decoder-only random-order AR with position-instruction tokens (Pang et al., arXiv 2412.01827).

Training (docs/methods/randar_arpg.md §1.1), per-sample random order sigma, 1 + 2N slots, plain causal mask:
    slot:  0      1         2        3         4        ...  2N-1          2N
    input: class  p(s0)     x_s0     p(s1)     x_s1     ...  p(s(N-1))     x_s(N-1)
p(k) is a shared learnable vector rotated by RoPE(k); p and x both carry RoPE(s_i). Loss at the p slots.
Decoding (§1.2): cache rows follow the training layout (class row 0, p_i row 1+2i, x_i row 2+2i). A step that
feeds the n tokens decoded last and asks m new queries writes [x_cur0, p_cur1, x_cur1, ..., x_cur(n-1),
p_next0..p_next(m-1)] from the row after p_cur0, *overwriting* the rows the previous step's extra queries
used, so the cache always ends in training layout. Official mode: the m new queries sit on consecutive rows
under the causal row mask, so query j also sees queries < j of its step (the released behaviour);
consistent mode masks them from each other, so every query sees exactly a training context.
CFG ramps on the count decoded *before* the step.
"""
from __future__ import annotations

import torch

from lightning_modules.base import ARModule
from lightning_modules.nn.sequence import SLOT_CLASS, SLOT_IMAGE, SLOT_POSITION, Seq, causal_row_mask
from lightning_modules.ordering import ANY_ORDER_SCHEDULES, AnyOrder, Capabilities


class RandAROrdering(AnyOrder):
    capabilities = Capabilities(any_order=True, parallel=True, per_sample_orders=True,
                                schedules=ANY_ORDER_SCHEDULES)
    default_sample = dict(schedule="randar_cosine", cfg_schedule="linear", cfg_start=1.0)

    def backbone_options(self, dims):
        return {"position_tokens": True}

    def default_num_steps(self, num_positions):
        return max(1, round(88 * num_positions / 256))  # the official 88 of 256, scaled to the grid

    def cache_length(self, num_positions):
        return 2 * num_positions + 1

    def train_inputs(self, codes, labels, step, generator, order=None):
        B, N = codes.shape
        dev = codes.device
        if order is None:
            order = self.train_order(B, step, generator, dev)
        x = torch.gather(codes, 1, order)  # [B, N] targets in decode order
        head = torch.zeros(B, 1, dtype=torch.long, device=dev)
        pair_kind = torch.tensor([SLOT_POSITION, SLOT_IMAGE], device=dev).repeat(N).expand(B, -1)
        kind = torch.cat([head + SLOT_CLASS, pair_kind], 1)  # [B, 1+2N]
        ids = torch.cat([head, torch.stack([torch.zeros_like(x), x], -1).flatten(1)], 1)
        pos = torch.cat([head - 1, order.repeat_interleave(2, dim=1)], 1)
        seq = Seq(kind=kind, ids=ids, pos=pos, labels=labels, rows=torch.arange(1 + 2 * N, device=dev),
                  out=torch.arange(1, 2 * N, 2, device=dev))
        return seq, x

    def decode_step(self, state, n):
        order, dev = state.order, state.order.device
        B2 = order.shape[0]
        fed = torch.arange(state.fed, state.done, device=dev)  # order indices whose tokens are fed now
        queries = torch.arange(state.done, state.done + n, device=dev)
        # pairs (p_i, x_i) at rows (1+2i, 2+2i); on later steps p_cur0 is already right in the cache
        kinds = [torch.tensor([SLOT_POSITION, SLOT_IMAGE], device=dev).repeat(len(fed))]
        rows = [torch.stack([1 + 2 * fed, 2 + 2 * fed], -1).flatten()]
        ids = [torch.stack([torch.zeros_like(state.tokens[:, fed]), state.tokens[:, fed]], -1).flatten(1)]
        pos = [order[:, fed].repeat_interleave(2, dim=1)]
        if state.first:
            kinds.insert(0, torch.tensor([SLOT_CLASS], device=dev))
            rows.insert(0, torch.zeros(1, dtype=torch.long, device=dev))
            ids.insert(0, torch.zeros(B2, 1, dtype=torch.long, device=dev))
            pos.insert(0, torch.full((B2, 1), -1, dtype=torch.long, device=dev))
        elif len(fed):
            kinds[0], rows[0], ids[0], pos[0] = kinds[0][1:], rows[0][1:], ids[0][:, 1:], pos[0][:, 1:]
        kinds.append(torch.full((n,), SLOT_POSITION, device=dev))
        rows.append(2 * state.done + 1 + torch.arange(n, device=dev))  # new queries on consecutive rows
        ids.append(torch.zeros(B2, n, dtype=torch.long, device=dev))
        pos.append(order[:, queries])
        rows = torch.cat(rows)
        L = rows.shape[0]
        mask = None
        if state.mode == "consistent" and n > 1:  # hide this step's queries from each other
            mask = causal_row_mask(rows, int(rows.max()) + 1).clone()
            qrows = rows[L - n:]
            mask[0, 0, L - n:, qrows] = torch.eye(n, dtype=torch.bool, device=dev)
        return Seq(kind=torch.cat(kinds).long().expand(B2, -1), ids=torch.cat(ids, 1), pos=torch.cat(pos, 1),
                   labels=state.labels, rows=rows, mask=mask, out=torch.arange(L - n, L, device=dev))


class RandARModule(ARModule):
    ordering_class = RandAROrdering
