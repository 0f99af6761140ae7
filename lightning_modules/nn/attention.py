"""Multi-head attention over SDPA with a static, preallocated KV cache written at explicit rows.

One class serves both backbone flavours: LlamaGen-style (fused bias-free ``wqkv``, 2D RoPE) and RAR's ViT
(fused ``qkv`` with bias, per-head QK-LayerNorm, no RoPE). The cache is written *at rows* rather than appended,
because RandAR's decode overwrites the previous step's extra query slots (docs/methods/randar_arpg.md §1.2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.nn.rope import apply_rope


class KVCache:
    """Static cache for one attention layer: k, v [B, H, max_len, hd]; ``length`` = rows visible so far."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """rows long [L]; k, v [B, H, L, hd]; length = max(rows) + 1 when the caller already knows it (one host
        sync per forward instead of one per layer). Returns the visible keys/values [B, H, Lk, hd]."""
        self.k.index_copy_(2, rows, k.to(self.k.dtype))
        self.v.index_copy_(2, rows, v.to(self.v.dtype))
        # Keys are truncated to max(row)+1 (official); rows only grow, and stale rows past it stay invisible.
        self.length = int(rows.max()) + 1 if length is None else length
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class CacheSet:
    """All KV caches of one backbone for one generation (one per self layer, plus the shared cross K/V)."""

    def __init__(self, caches: list[KVCache], shared: KVCache | None = None):
        self.layers = caches
        self.shared = shared

    @staticmethod
    def prepare(rows: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
        """Once per cached forward (not per layer): the visible length and the self-attention mask.

        mask None means causal over rows. A single new slot is always at the highest row, so it sees every key
        and needs no mask at all (the common decode step: SDPA then runs unmasked; on CUDA an explicit mask
        would rule out the flash kernel). Several slots get the boolean row mask, built once here."""
        length = int(rows.max()) + 1
        if mask is None and rows.shape[0] > 1:
            keys = torch.arange(length, device=rows.device)
            mask = (keys[None, :] <= rows[:, None])[None, None]  # [1, 1, L, Lk]: slot at row r sees rows <= r
        return mask, length

    def static_keys(self, rows: torch.Tensor) -> tuple[int, int]:
        """The fast decode path's (visible length, key count) for a forward writing ``rows``, at plan time: the
        length ``prepare`` would find, and the static key count every layer attends over (key_bucket of it)."""
        length = int(rows.max()) + 1
        return length, key_bucket(length, self.layers[0].k.shape[2])


# The fast path's key count: the visible length rounded up to the next 1/KEY_BUCKETS of the cache, so a generation
# has at most KEY_BUCKETS key counts (static shapes to capture) and reads at most 1/KEY_BUCKETS of the cache in vain.
# Attending over the whole cache instead read ~2x the keys a raster step needs, the bulk of a big-batch step's bytes.
KEY_BUCKETS = 8


def key_bucket(visible: int, total: int, buckets: int | None = None) -> int:
    """The static key count of a fast-path step whose eager twin sees ``visible`` of a ``total``-row cache
    (``buckets`` None: KEY_BUCKETS, read at call time; 1 = the whole cache, as before the buckets)."""
    size = -(-total // (buckets or KEY_BUCKETS))
    return min(total, -(-visible // size) * size)


@dataclass
class StaticPrep:
    """What ``CacheSet.prepare`` finds per forward, decided once from the decode plan (the fast decode path,
    lightning_modules/fast_decode.py): every layer then attends over the cache's first K rows, K = the mask's last
    dim = key_bucket(visible length, Lmax), a static shape, and the mask hides the rows the eager step would have
    cut off (rows at or past its visible length) or masked."""

    mask: torch.Tensor  # bool [B|1, 1, L, K]: self-attention over the cache's first K rows
    query_mask: torch.Tensor | None = None  # bool [B|1, 1, Q, K]: the query stream's keys (cross layers)
    prefix: bool = False  # rar_vit: this forward carries the learned cls prefix slot (row 0)


def static_mask(rows: torch.Tensor, mask: torch.Tensor | None, total: int) -> torch.Tensor:
    """bool [B|1, 1, L, total]: the keys ``CacheSet.prepare`` + ``KVCache.write`` leave visible, widened to
    ``total`` keys (>= the visible length). mask None = causal over rows (a slot at row r sees rows <= r); an
    explicit mask [.., L, Lk] covers the visible length Lk = max(rows) + 1 and everything past it is hidden, as the
    truncation hides it."""
    keys = torch.arange(total, device=rows.device)
    if mask is None:
        return (keys[None, :] <= rows[:, None])[None, None]
    return F.pad(mask.to(rows.device).bool(), (0, total - mask.shape[-1]), value=False)


def attend(q, k, v, mask, causal: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """q [B,H,L,hd], k/v [B,H,Lk,hd], mask bool [B|1,1,L,Lk] or None -> [B, L, H*hd]."""
    if mask is not None:
        mask = mask.to(q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                         dropout_p=dropout_p)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, *, bias: bool = False, qk_norm: bool = False, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0, names: tuple[str, str] = ("wqkv", "wo")):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"model.dim {dim} not divisible by model.n_head {n_head}")
        self.n_head, self.head_dim = n_head, dim // n_head
        # Official key names differ per flavour (wqkv/wo vs qkv/proj); keep them so weights map 1:1.
        self.qkv_name, self.out_name = names
        setattr(self, names[0], nn.Linear(dim, 3 * dim, bias=bias))
        setattr(self, names[1], nn.Linear(dim, dim, bias=bias))
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def project_qkv(self, x: torch.Tensor, rope: torch.Tensor | None):
        """x [B, L, D] -> q, k, v [B, H, L, hd] (RoPE and QK-norm applied)."""
        B, L, _ = x.shape
        qkv = getattr(self, self.qkv_name)(x).view(B, L, 3, self.n_head, self.head_dim)
        if self.q_norm is not None:  # per-head QK-LayerNorm (separate weights for q and k)
            q, k, v = qkv.unbind(2)
            q, k = self.q_norm(q), self.k_norm(k)
        else:
            v = qkv[:, :, 2]
            q, k = qkv[:, :, :2], None  # [B, L, 2, H, hd] view: q and k rotate in one pass
        if rope is not None:
            if k is None:  # the (2, H) dims merge into 2H heads without a copy; same arithmetic as per tensor
                q, k = apply_rope(q.flatten(2, 3), rope).view(B, L, 2, self.n_head, self.head_dim).unbind(2)
            else:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        elif k is None:
            q, k = q.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, rope, mask, rows, cache: KVCache | None = None, length: int | None = None) -> torch.Tensor:
        """With a cache, ``mask``/``length`` come from CacheSet.prepare (mask None = every key visible); a caller
        that did not prepare passes length None and the causal row mask is derived here."""
        q, k, v = self.project_qkv(x, rope)
        if cache is not None:
            if length is None:
                mask, length = CacheSet.prepare(rows, mask)
            k, v = cache.write(rows, k, v, length)
        p = self.attn_dropout if self.training else 0.0
        out = attend(q, k, v, mask, causal=cache is None, dropout_p=p)
        return self.resid_dropout(getattr(self, self.out_name)(out))


class CrossAttention(nn.Module):
    """Queries read an externally computed K/V (ARPG: one shared K/V for every cross layer); only q and o here."""

    def __init__(self, dim: int, n_head: int, resid_dropout: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x, rope, k, v, mask) -> torch.Tensor:
        """x [B, Q, D]; k, v [B, H, Lk, hd]; mask bool [B|1,1,Q,Lk] or None (= all keys visible)."""
        B, Q, _ = x.shape
        q = self.wq(x).view(B, Q, self.n_head, self.head_dim)
        q = apply_rope(q, rope).transpose(1, 2)
        return self.resid_dropout(self.wo(attend(q, k, v, mask, causal=False)))
