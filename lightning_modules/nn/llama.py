"""LlamaGen-style decoder backbone (the `llama` flavour), with the optional pieces the orderings switch on.

Block: pre-norm, h = x + Attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)); no biases; 2D RoPE from explicit
position ids; zero-initialised head. Optional features (each a constructor flag, never a method name):
  - ``position_tokens``: a shared learnable vector rotated by RoPE(pos) used at SLOT_POSITION slots (RandAR).
  - ``target_aware``: a learned table added for the position each slot predicts next (RAR's target-aware PE).
  - ``cross_layers``: the last k layers become cross layers: position-only [MASK] queries with their target's
    RoPE read one shared K/V computed once from the self layers' output (ARPG's two-pass decoder).
Shapes: B batch, L slots, Q queries, D width, H heads, hd head dim, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_modules.nn.attention import CacheSet, CrossAttention, KVCache, SelfAttention, StaticPrep, static_mask
from lightning_modules.nn.rope import Rope2D, apply_rope
from lightning_modules.nn.sequence import SLOT_CLASS, SLOT_POSITION, Seq, gather_slots


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """int(2*4d/3) rounded UP to a multiple of 256 (LlamaGen): 2816 at d=1024, 3584 at 1280, 4096 at 1536."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics, cast back, then scale (LlamaGen's op order; parity depends on it)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, dim, n_head, hidden, eps, resid_dropout, ffn_dropout):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = SelfAttention(dim, n_head, resid_dropout=resid_dropout)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = SwiGLU(dim, hidden, ffn_dropout)

    def forward(self, x, rope, mask, rows, cache=None, length=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, rows, cache, length)
        return h + self.feed_forward(self.ffn_norm(h))


class CrossBlock(nn.Module):
    def __init__(self, dim, n_head, hidden, eps, resid_dropout, ffn_dropout):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = CrossAttention(dim, n_head, resid_dropout)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = SwiGLU(dim, hidden, ffn_dropout)

    def forward(self, q, rope, k, v, mask):
        h = q + self.attention(self.attention_norm(q), rope, k, v, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaBackbone(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, dim: int, n_layer: int, n_head: int,
                 grid: tuple[int, int], *, cross_layers: int = 0, position_tokens: bool = False,
                 target_aware: bool = False, ffn_hidden: int = 0, norm_eps: float = 1e-5, rope_base: float = 10000.0,
                 token_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0,
                 grad_checkpointing: bool = False, class_rope: str = "zero"):
        super().__init__()
        if not 0 <= cross_layers < n_layer:
            raise ValueError(f"model.cross_layers must be in [0, n_layer={n_layer}), got {cross_layers}")
        self.vocab_size, self.num_classes, self.dim, self.n_head = vocab_size, num_classes, dim, n_head
        self.grid = tuple(grid)
        self.num_positions = grid[0] * grid[1]
        self.grad_checkpointing = grad_checkpointing
        hidden = ffn_hidden or swiglu_hidden(dim)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.cls_embedding = nn.Embedding(num_classes + 1, dim)  # row num_classes = null class (CFG)
        self.token_dropout = nn.Dropout(token_dropout)
        self.pos_instruct = nn.Parameter(torch.randn(1, dim) * 0.02) if position_tokens else None
        self.target_embed = nn.Embedding(self.num_positions, dim) if target_aware else None
        n_self = n_layer - cross_layers
        self.layers = nn.ModuleList(Block(dim, n_head, hidden, norm_eps, resid_dropout, ffn_dropout)
                                    for _ in range(n_self))
        if cross_layers:
            self.query_token = nn.Parameter(torch.randn(1, dim) * 0.02)  # ARPG's [MASK] embedding row
            self.kv_norm = RMSNorm(dim, norm_eps)
            self.to_kv = nn.Linear(dim, 2 * dim, bias=False)  # the one shared K/V projection (to_k | to_v)
            self.cross = nn.ModuleList(CrossBlock(dim, n_head, hidden, norm_eps, resid_dropout, ffn_dropout)
                                       for _ in range(cross_layers))
        else:
            self.cross = None
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.rope = Rope2D(grid[0], grid[1], dim // n_head, rope_base, class_rope)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every Linear/Embedding ~ N(0, 0.02); zero-initialised head (LlamaGen)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    # ------------------------------------------------------------------ embedding
    def embed(self, seq: Seq, rope: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Slots -> [B, L, D]: class rows, image codes, or RoPE-rotated position-instruction vectors. ``check``
        False skips the slot-kind check (a host sync): the fast decode path ran it once per step at plan time."""
        kind = seq.kind[..., None]
        x = self.token_dropout(self.tok_embeddings(seq.ids.clamp(0, self.vocab_size - 1)))
        cls = self.cls_embedding(seq.labels)[:, None, :].expand_as(x)
        x = torch.where(kind == SLOT_CLASS, self.token_dropout(cls), x)
        if self.pos_instruct is not None:  # no data-dependent branch: no host sync, nothing to break a compile
            B, L = seq.kind.shape
            # RandAR: the shared vector, viewed per head and rotated to the target position, IS the embedding
            # (and attention rotates its q/k again: "RoPE applied twice", issue #13 — kept for parity).
            p = self.pos_instruct.view(1, 1, self.n_head, -1).expand(B, L, -1, -1)
            p = apply_rope(p, rope).reshape(B, L, self.dim).to(x.dtype)
            x = torch.where(kind == SLOT_POSITION, p, x)
        elif check and not torch.compiler.is_compiling() and bool((seq.kind == SLOT_POSITION).any()):
            raise ValueError("position-instruction slots need a backbone built with position_tokens=True")
        if self.target_embed is not None and seq.target is not None:
            ta = self.target_embed(seq.target.clamp(min=0)) * (seq.target >= 0)[..., None]
            x = x + ta.to(x.dtype)
        return x

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> CacheSet:
        device = device or self.output.weight.device
        hd = self.dim // self.n_head
        caches = [KVCache(batch, self.n_head, max_len, hd, device, dtype) for _ in self.layers]
        shared = KVCache(batch, self.n_head, max_len, hd, device, dtype) if self.cross is not None else None
        return CacheSet(caches, shared)

    def prepare_static(self, seq: Seq, cache: CacheSet) -> StaticPrep:
        """The fast decode path's per-step decisions (at plan time, host syncs allowed): the slot-kind check, and
        self / query masks over the step's bucketed key count (CacheSet.static_keys, static_mask)."""
        if self.pos_instruct is None and bool((seq.kind == SLOT_POSITION).any()):
            raise ValueError("position-instruction slots need a backbone built with position_tokens=True")
        length, keys = cache.static_keys(seq.rows)  # the eager step's visible length, the bucketed key count
        qmask = None
        if self.cross is not None:  # queries see the written content rows < max(rows) + 1, or their own mask
            qmask = seq.query_mask if seq.query_mask is not None else torch.ones(
                1, 1, seq.query_pos.shape[1], length, dtype=torch.bool, device=seq.rows.device)
            qmask = static_mask(seq.rows, qmask, keys)
        return StaticPrep(static_mask(seq.rows, seq.mask, keys), qmask)

    def forward(self, seq: Seq, cache: CacheSet | None = None, prepared: StaticPrep | None = None) -> torch.Tensor:
        """Logits float32 [B, M, V] at ``seq.out`` (slots, or queries when the backbone has cross layers).
        ``prepared`` (with a cache): the fast decode path's static masks instead of ``cache.prepare``."""
        rope = self.rope(seq.pos)
        x = self.embed(seq, rope, check=prepared is None)
        mask, length, qmask = seq.mask, None, seq.query_mask
        if prepared is not None:  # static shapes: every layer attends over the bucketed key count, no host sync
            mask, length, qmask = prepared.mask, prepared.mask.shape[-1], prepared.query_mask
        elif cache is not None:  # visible length and mask once per forward, shared by every layer
            mask, length = cache.prepare(seq.rows, seq.mask)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, seq.rows, layer_cache, length, use_reentrant=False)
            else:
                x = layer(x, rope, mask, seq.rows, layer_cache, length)
        if self.cross is not None:
            x = self.cross_decode(x, rope, seq, cache, length, qmask)
        x = gather_slots(x, seq.out)
        return self.output(self.norm(x)).float()

    def cross_decode(self, x, rope, seq: Seq, cache: CacheSet | None, length: int | None = None,
                     query_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ARPG pass 2: shared K/V from the content stream, then queries through the cross layers -> [B, Q, D]."""
        B, L, _ = x.shape
        k, v = self.to_kv(self.kv_norm(x)).view(B, L, 2, self.n_head, -1).unbind(2)
        k = apply_rope(k, rope).transpose(1, 2)  # RoPE on k only (official)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.shared.write(seq.rows, k, v, length)
        qrope = self.rope(seq.query_pos)
        q = self.query_token.to(x.dtype).expand(B, seq.query_pos.shape[1], -1)
        for blk in self.cross:
            if self.grad_checkpointing and self.training:
                q = checkpoint(blk, q, qrope, k, v, query_mask, use_reentrant=False)
            else:
                q = blk(q, qrope, k, v, query_mask)
        return q
