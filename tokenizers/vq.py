"""LlamaGen VQ tokenizer (VQ-16 / VQ-8 layout), written from docs/methods/randar_arpg.md §4.1.

Every module name equals the official ``VQModel`` state-dict key, so a released ``vq_ds16_c2i.pt`` state dict
loads with ``strict=True``:
  encoder.conv_in, encoder.conv_blocks.{i}.res.{j}, encoder.conv_blocks.{last}.attn.{j},
  encoder.conv_blocks.{i}.downsample.conv, encoder.mid.{0,1,2}, encoder.norm_out, encoder.conv_out,
  quant_conv, quantize.embedding.weight, quantize.codebook_used, post_quant_conv,
  decoder.conv_in, decoder.mid.{0,1,2}, decoder.conv_blocks.{i}.res.{j} (i = 0 is the LOWEST resolution),
  decoder.conv_blocks.0.attn.{j}, decoder.conv_blocks.{i}.upsample.conv, decoder.norm_out, decoder.conv_out.
Pixels enter as (p/255 - 0.5)/0.5 in [-1, 1] and leave as clamp(127.5*x + 128) -> uint8 (the LlamaGen sampler).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.base import ImageTokenizer, check_codes, check_images

USAGE_RING = 65536  # length of the official ``codebook_used`` ring buffer

# Constructor arguments; keys match the official ModelArgs (+ ``ch`` and ``num_res_blocks``, fixed in VQModel).
PRESETS: dict[str, dict] = {
    # The released VQ-16 (vq_ds16_c2i.pt): 72M params, 256 px -> 16x16 codes.
    "vq16": dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                 commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=[1, 1, 2, 2, 4],
                 decoder_ch_mult=[1, 1, 2, 2, 4], z_channels=256, dropout_p=0.0, ch=128, num_res_blocks=2),
    # Same structure, 3 levels of downsampling (f = 8).
    "vq8": dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=[1, 2, 2, 4],
                decoder_ch_mult=[1, 2, 2, 4], z_channels=256, dropout_p=0.0, ch=128, num_res_blocks=2),
    # Released structure at the minimum width (GroupNorm needs 32 channels); trains on CPU. 32 px -> 4x4.
    "tiny": dict(codebook_size=256, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                 commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=[1, 1, 2, 2],
                 decoder_ch_mult=[1, 1, 2, 2], z_channels=32, dropout_p=0.0, ch=32, num_res_blocks=2),
    # The embedded digits default: 8x8 digits upscaled to 32x32 -> 8x8 codes, 1 enc / 2 dec blocks per level
    # (cheap enough to train in ~2 min on 2 CPU cores). The entropy term keeps all 128 codes in use: without it
    # 400 steps collapse to ~25 codes (val PSNR 32.3 dB, 25/128 codes vs 28.7 dB, 128/128 with it).
    "digits": dict(codebook_size=128, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                   commit_loss_beta=0.25, entropy_loss_ratio=0.05, encoder_ch_mult=[1, 1, 2],
                   decoder_ch_mult=[1, 1, 2], z_channels=32, dropout_p=0.0, ch=32, num_res_blocks=1),
    # Your own 32-64 px images (experiments/configs/tokenizer/small_vq.yaml): the digits widths, one more level
    # (f = 8: 64 px -> 8x8 codes, the 64 tokens per image of the demo) and twice the codes for colour photos. At
    # 32 px drop a level (encoder/decoder_ch_mult [1, 1, 2]: 8x8 codes) rather than train on a 4x4 grid.
    "small": dict(codebook_size=256, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                  commit_loss_beta=0.25, entropy_loss_ratio=0.05, encoder_ch_mult=[1, 1, 2, 2],
                  decoder_ch_mult=[1, 1, 2, 2], z_channels=32, dropout_p=0.0, ch=32, num_res_blocks=1),
}


def merge_preset(presets: dict, what: str, preset: str, **overrides) -> dict:
    """``presets[preset]`` with ``overrides`` applied; unknown presets and keys are refused by name."""
    if preset not in presets:
        raise ValueError(f"tokenizer.preset: unknown {what} preset {preset!r} (choose from {sorted(presets)})")
    cfg = copy.deepcopy(presets[preset])
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"tokenizer.{key}: not a {what} option (choose from {sorted(cfg)})")
        cfg[key] = list(value) if isinstance(value, tuple) else value
    return cfg


def preset_config(preset: str, **overrides) -> dict:
    """Preset constructor arguments with ``overrides`` applied (unknown keys refused by name)."""
    return merge_preset(PRESETS, "LlamaGen VQ", preset, **overrides)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"tokenizer: {channels} channels is not a multiple of the 32 GroupNorm groups (raise ch)")
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv-norm-swish-dropout-conv; 1x1 ``nin_shortcut`` on the block INPUT when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (explicit bmm+softmax, as released)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [B, HW, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, HW]
        v = self.v(h).reshape(b, c, hh * ww)  # [B, C, HW]
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # [B, HWq, HWk]
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric right/bottom zero pad, then an unpadded stride-2 conv (the released weights expect this).
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level of the encoder or decoder: its res blocks, each followed by its attention block where
    the level has them (the lowest resolution only)."""
    for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], z_channels: int, num_res_blocks: int = 2, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = [1] + list(ch_mult)
        self.conv_blocks = nn.ModuleList()
        last = len(ch_mult) - 1
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == last:  # attention only at the lowest resolution
                    level.attn.append(AttnBlock(block_in))
            if i != last:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, dropout)])
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, z, H/f, W/f]
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], z_channels: int, num_res_blocks: int = 2, dropout: float = 0.0):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, dropout)])
        self.conv_blocks = nn.ModuleList()
        for i in range(n):  # i = 0 is the lowest resolution
            level = nn.Module()
            level.res, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[n - 1 - i]
            for _ in range(num_res_blocks + 1):  # the decoder has one more block per level
                level.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == 0:
                    level.attn.append(AttnBlock(block_in))
            if i != n - 1:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, h, w] -> [B, 3, H, W]
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def entropy_loss(logits: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus batch-average entropy of softmax(logits/T); logits [N, K] (= -distance)."""
    logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    log_probs = torch.log_softmax(logits + 1e-5, dim=-1)
    avg = probs.mean(dim=0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(dim=-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest codebook row (optionally on the unit sphere) with a straight-through estimator."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, entropy_ratio: float = 0.0,
                 l2_norm: bool = True, show_usage: bool = True):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.entropy_ratio, self.l2_norm, self.show_usage = entropy_ratio, l2_norm, show_usage
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if show_usage:  # ring of the last 65536 codes; persistent because released checkpoints carry it
            self.register_buffer("codebook_used", torch.zeros(USAGE_RING))

    def codebook(self) -> torch.Tensor:  # [K, D], normalised when l2 is on
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance [N, K] in the released op order (codes must match exactly)."""
        e = self.codebook()
        return (z_flat.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1)
                - 2 * torch.einsum("bd,dn->bn", z_flat, e.t()))

    def forward(self, z: torch.Tensor):
        """z [B, D, h, w] -> (z_q [B, D, h, w] straight-through, losses dict, codes [B, h, w])."""
        b, d, h, w = z.shape
        if d != self.e_dim:
            raise ValueError(f"quantize: latent has {d} channels, codebook_embed_dim is {self.e_dim}")
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, h, w, D]
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        z_flat = z.reshape(-1, d)  # [N, D]
        dist = self.distances(z_flat)  # [N, K]
        codes = torch.argmin(dist, dim=1)  # [N]
        z_q = self.codebook()[codes].view(z.shape)  # [B, h, w, D]
        losses = {}
        if self.training:
            losses["codebook"] = torch.mean((z_q - z.detach()) ** 2)
            losses["commit"] = self.beta * torch.mean((z_q.detach() - z) ** 2)
            losses["entropy"] = (self.entropy_ratio * entropy_loss(-dist) if self.entropy_ratio > 0
                                 else z.new_zeros(()))
            if self.show_usage:
                self._record_usage(codes)
        z_q = z + (z_q - z).detach()  # straight-through: forward = z_q, gradient flows to z
        return z_q.permute(0, 3, 1, 2), losses, codes.view(b, h, w)  # channels-last view, as released

    @torch.no_grad()
    def _record_usage(self, codes: torch.Tensor) -> None:
        n = min(codes.numel(), USAGE_RING)
        self.codebook_used[:-n] = self.codebook_used[n:].clone()
        self.codebook_used[-n:] = codes[-n:].to(self.codebook_used.dtype)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes long [B, h, w] -> codebook vectors [B, D, h, w]."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()


class LlamaGenVQ(ImageTokenizer):
    """The LlamaGen ``VQModel`` as an ImageTokenizer. Keys are official (no prefix)."""

    name = "llamagen_vq"

    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8, codebook_l2_norm: bool = True,
                 codebook_show_usage: bool = True, commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0,
                 encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4), z_channels: int = 256,
                 dropout_p: float = 0.0, ch: int = 128, num_res_blocks: int = 2):
        super().__init__()
        if len(encoder_ch_mult) != len(decoder_ch_mult):
            raise ValueError(f"tokenizer: encoder_ch_mult {list(encoder_ch_mult)} and decoder_ch_mult "
                             f"{list(decoder_ch_mult)} must have the same number of levels")
        self._config = dict(codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim,
                            codebook_l2_norm=bool(codebook_l2_norm), codebook_show_usage=bool(codebook_show_usage),
                            commit_loss_beta=float(commit_loss_beta), entropy_loss_ratio=float(entropy_loss_ratio),
                            encoder_ch_mult=list(encoder_ch_mult), decoder_ch_mult=list(decoder_ch_mult),
                            z_channels=z_channels, dropout_p=float(dropout_p), ch=ch, num_res_blocks=num_res_blocks)
        self.vocab_size = codebook_size
        self.downsample = 2 ** (len(encoder_ch_mult) - 1)
        self.encoder = Encoder(ch, list(encoder_ch_mult), z_channels, num_res_blocks, dropout_p)
        self.decoder = Decoder(ch, list(decoder_ch_mult), z_channels, num_res_blocks, dropout_p)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, commit_loss_beta, entropy_loss_ratio,
                                        codebook_l2_norm, codebook_show_usage)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    @classmethod
    def from_preset(cls, preset: str = "vq16", **overrides) -> "LlamaGenVQ":
        return cls(**preset_config(preset, **overrides))

    def config(self) -> dict:
        return copy.deepcopy(self._config)

    # ---- float paths (images in [-1, 1]) ----
    @staticmethod
    def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - 0.5) / 0.5  # the released image transform, op for op

    @staticmethod
    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # truncating cast, as the LlamaGen sampler

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, D, h, w]
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:  # [B, D, h, w] -> [B, 3, H, W], unclamped
        return self.decoder(self.post_quant_conv(z_q))

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:  # long [B, h, w] -> [B, 3, H, W] in [-1, 1]
        return self.decode_latent(self.quantize.lookup(codes))

    def forward(self, x: torch.Tensor):
        """x [B, 3, H, W] in [-1, 1] -> (reconstruction, losses dict, codes [B, h, w])."""
        z_q, losses, codes = self.quantize(self.pre_quant(x))
        return self.decode_latent(z_q), losses, codes

    # ---- ImageTokenizer protocol ----
    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.name, self.downsample)
        x = self.to_model_space(images.to(self.quant_conv.weight.device))
        z = self.pre_quant(x).permute(0, 2, 3, 1)  # [B, h, w, D]
        if self.quantize.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        b, h, w, d = z.shape
        return torch.argmin(self.quantize.distances(z.reshape(-1, d)), dim=1).view(b, h, w)

    @torch.no_grad()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        check_codes(codes, self.name, self.vocab_size)
        return self.to_pixels(self.decode_code(codes.to(self.quant_conv.weight.device).long()))

    @torch.no_grad()
    def codebook_usage(self) -> float:
        """Fraction of codes seen in the usage ring (the ring starts as zeros, so code 0 always counts)."""
        if not self.quantize.show_usage:
            return math.nan
        return len(torch.unique(self.quantize.codebook_used)) / self.vocab_size


def build_llamagen_vq(path: str = "", preset: str | None = None, **config) -> LlamaGenVQ:
    """Registry factory: random init when ``path`` is empty, else a local weights file (never a download)."""
    if not path:
        return LlamaGenVQ.from_preset(preset or "vq16", **config)
    from lightning_modules.official.llamagen_vq import load_llamagen_vq

    return load_llamagen_vq(path, preset=preset, **config)


def build_digits_vq(path: str = "", preset: str | None = None, **config) -> LlamaGenVQ:
    """``llamagen_vq`` with the small digits preset as default (e.g. runs/digits_vq/tokenizer.safetensors)."""
    if path:  # the file's embedded config decides; an explicit preset is still checked against it
        return build_llamagen_vq(path, preset=preset, **config)
    return LlamaGenVQ.from_preset(preset or "digits", **config)


# registry.check_options: the option names (and preset) before anything is built; every preset has the same keys
build_llamagen_vq.check_options = lambda path="", preset=None, **config: preset_config(preset or "vq16", **config)
build_digits_vq.check_options = lambda path="", preset=None, **config: preset_config(preset or "digits", **config)
