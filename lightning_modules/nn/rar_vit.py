"""RAR's backbone (the `rar_vit` flavour): AdaLN-Zero ViT with QK-LayerNorm and learned position tables.

Faithful to bytedance/1d-tokenizer `modeling/rar.py` (docs/methods/rar.md §2-3):
  - one shared embedding table of V + 1 + C + 1 rows: codes | [MASK] (unused) | classes | null class;
  - a learned ``cls_token`` prefix slot (zeros) before the class slot; its output is never used;
  - additive ``pos_embed`` (row 0 cls, 1 class, 2+k image position k) and ``target_aware_pos_embed``
    (row 2+t for the position t predicted next; zero when none);
  - AdaLN vector per slot c_j = Emb[class] + timesteps_embeddings[j], j the *slot index* (not the position);
  - blocks x += gate * f(LN(x)(1+scale)+shift), chunk order (shift, scale, gate) x2; final layer (scale, shift).
Slots of a ``Seq`` map to internal slot rows+1 (the cls prefix is row 0 and is added when row 0 is present).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_modules.nn.attention import CacheSet, KVCache, SelfAttention, StaticPrep, static_mask
from lightning_modules.nn.sequence import SLOT_CLASS, SLOT_IMAGE, Seq, gather_slots


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class AdaLNBlock(nn.Module):
    def __init__(self, dim, n_head, hidden, dropout, attn_dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, n_head, bias=True, qk_norm=True, attn_dropout=attn_dropout,
                                  resid_dropout=dropout, names=("qkv", "proj"))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, mask, rows, cache=None, length=None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), None, mask, rows, cache, length)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalAdaLN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)  # (scale, shift): reverse of the blocks
        return modulate(self.norm_final(x), shift, scale)


class RARViTBackbone(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, dim: int, n_layer: int, n_head: int,
                 grid: tuple[int, int], *, ffn_hidden: int = 0, dropout: float = 0.0, attn_dropout: float = 0.0,
                 target_aware: bool = True, grad_checkpointing: bool = False, **unused_llama_options):
        super().__init__()
        for key, value in unused_llama_options.items():
            if value not in (0, 0.0, False, None):
                raise ValueError(f"model.{key} is not supported by the rar_vit flavour")
        self.vocab_size, self.num_classes, self.dim = vocab_size, num_classes, dim
        self.grid = tuple(grid)
        n = self.num_positions = grid[0] * grid[1]
        self.target_aware = target_aware
        self.grad_checkpointing = grad_checkpointing
        self.n_head = n_head
        self.embeddings = nn.Embedding(vocab_size + 1 + num_classes + 1, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Official shapes (N+1024 / N+100 rows) are kept so released weights load; only N+2 rows are used.
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1024, dim))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, n + 1024, dim))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, n + 100, dim))
        hidden = ffn_hidden or 4 * dim
        self.blocks = nn.ModuleList(AdaLNBlock(dim, n_head, hidden, dropout, attn_dropout) for _ in range(n_layer))
        self.adaln_before_head = FinalAdaLN(dim)
        self.lm_head = nn.Linear(dim, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=0.02)
        for blk in list(self.blocks) + [self.adaln_before_head]:  # AdaLN-Zero
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)

    def class_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return labels + self.vocab_size + 1  # label C (null) -> V + C + 1, the official none_condition_id

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> CacheSet:
        device = device or self.lm_head.weight.device
        hd = self.dim // self.n_head
        return CacheSet([KVCache(batch, self.n_head, max_len + 1, hd, device, dtype) for _ in self.blocks])

    def check(self, seq: Seq) -> None:
        if seq.query_pos is not None or seq.mask is not None or bool((seq.kind > SLOT_IMAGE).any()):
            raise ValueError("the rar_vit flavour supports causal class and image slots only (orderings raster, rar)")

    @staticmethod
    def internal_rows(seq: Seq) -> tuple[torch.Tensor, bool]:
        """(internal slot rows [L'], prefix?): rows + 1, with the cls prefix's row 0 first when row 0 is fed."""
        rows = seq.rows + 1  # the cls prefix owns row 0
        prefix = bool((seq.rows == 0).any())
        return (torch.cat([rows.new_zeros(1), rows]) if prefix else rows), prefix

    def prepare_static(self, seq: Seq, cache: CacheSet) -> StaticPrep:
        """The fast decode path's per-step decisions at plan time: the check, the prefix, the static mask over the
        step's bucketed key count (CacheSet.static_keys)."""
        self.check(seq)
        rows, prefix = self.internal_rows(seq)
        _, keys = cache.static_keys(rows)
        return StaticPrep(static_mask(rows, None, keys), prefix=prefix)

    def forward(self, seq: Seq, cache: CacheSet | None = None, prepared: StaticPrep | None = None) -> torch.Tensor:
        """Logits float32 [B, M, V] at ``seq.out``; ``prepared``: the fast decode path's static masks (no sync)."""
        if prepared is None and not torch.compiler.is_compiling():  # a host sync: no graph break under compile
            self.check(seq)
        B, L = seq.kind.shape
        cls_ids = self.class_ids(seq.labels)[:, None].expand(B, L)
        ids = torch.where(seq.kind == SLOT_CLASS, cls_ids, seq.ids)
        x = self.embeddings(ids)  # [B, L, D]
        pos_rows = torch.where(seq.kind == SLOT_CLASS, torch.ones_like(seq.pos), seq.pos + 2)
        x = x + self.pos_embed[0, pos_rows]
        if self.target_aware and seq.target is not None:
            ta = self.target_aware_pos_embed[0, (seq.target + 2).clamp(min=2)] * (seq.target >= 0)[..., None]
            x = x + ta
        if prepared is not None:
            prefix = prepared.prefix
            rows = torch.cat([seq.rows.new_zeros(1), seq.rows + 1]) if prefix else seq.rows + 1
        else:
            rows, prefix = self.internal_rows(seq)  # internal slot index: the cls prefix owns row 0
        if prefix:  # the prefill carries the class slot: prepend the learned cls token
            x = torch.cat([self.cls_token.expand(B, -1, -1) + self.pos_embed[:, :1], x], dim=1)
        c = self.embeddings(self.class_ids(seq.labels))[:, None] + self.timesteps_embeddings[0, rows][None]
        mask, length = None, None
        if prepared is not None:  # static shapes: the bucketed key count, masked; no host sync
            mask, length = prepared.mask, prepared.mask.shape[-1]  # the key count K
        elif cache is not None:  # visible length and causal row mask once per forward, not once per block
            mask, length = cache.prepare(rows, None)
        for i, blk in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, c, mask, rows, layer_cache, length, use_reentrant=False)
            else:
                x = blk(x, c, mask, rows, layer_cache, length)
        # drop the cls prefix output, keep the requested slots, then the final AdaLN and head
        x = gather_slots(x[:, -L:], seq.out)
        c = gather_slots(c[:, -L:].expand(B, -1, -1), seq.out)
        return self.lm_head(self.adaln_before_head(x, c)).float()
