"""MaskGIT VQGAN (the frozen RAR tokenizer), written from docs/methods/rar.md §7 and tests/assets/parity/README.md.

Module names equal the 1d-tokenizer ``PretrainedTokenizer`` keys (encoder.down.{i}.block.{j}, encoder.mid.{j},
decoder.up.{i}.block.{j}, decoder.up.{i}.upsample_conv, quantize.embedding.weight), so the released
``maskgit-vqgan-imagenet-f16-256.bin`` loads strictly. Pixels enter as p/255 in [0, 1]; the decoder output is
clamped to [0, 1] and leaves as (x*255) cast to uint8 (truncating, as the RAR sampler does).
Quirks kept on purpose because the released weights expect them:
- a ResnetBlock whose width changes returns h + nin_shortcut(h) (the INPUT is dropped);
- every conv pads TF-"same" (Conv2dSame); ResnetBlock convs and encoder.conv_in have no bias.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.base import ImageTokenizer, check_codes, check_images
from tokenizers.vq import group_norm

PRESETS: dict[str, dict] = {
    # The released tokenizer: 1024 x 256 codebook, 256 px -> 16x16 codes, 54.5M params.
    "maskgit_1024": dict(hidden_channels=128, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256,
                         num_embeddings=1024, dropout=0.0, commitment_cost=0.25),
    # Released structure at the minimum GroupNorm width (parity fixtures use this width).
    "tiny": dict(hidden_channels=32, channel_mult=[1, 1, 1, 1, 2], num_res_blocks=2, z_channels=32,
                 num_embeddings=64, dropout=0.0, commitment_cost=0.25),
}


def preset_config(preset: str, **overrides) -> dict:
    from tokenizers.vq import merge_preset

    return merge_preset(PRESETS, "MaskGIT VQ", preset, **overrides)


def config_from_official(cfg: dict) -> dict:
    """Flatten the official {vqgan_config: {...}, num_embeddings, embedding_dim, commitment_cost} layout."""
    v = cfg["vqgan_config"]
    if cfg.get("embedding_dim", v["z_channels"]) != v["z_channels"] or v.get("num_channels", 3) != 3:
        raise ValueError("maskgit_vq: embedding_dim must equal z_channels and num_channels must be 3")
    if v.get("num_resolutions", len(v["channel_mult"])) != len(v["channel_mult"]):
        raise ValueError("maskgit_vq: num_resolutions must equal len(channel_mult)")
    return dict(hidden_channels=v["hidden_channels"], channel_mult=list(v["channel_mult"]),
                num_res_blocks=v["num_res_blocks"], z_channels=v["z_channels"],
                num_embeddings=cfg["num_embeddings"], dropout=float(v.get("dropout", 0.0)),
                commitment_cost=float(cfg.get("commitment_cost", 0.25)))


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (extra pixel on the right/bottom)."""

    @staticmethod
    def _pad(size: int, k: int, s: int, d: int) -> int:
        return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph = self._pad(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = self._pad(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.changes_width = in_ch != out_ch
        self.norm1 = group_norm(in_ch)
        self.conv1 = Conv2dSame(in_ch, out_ch, 3, bias=False)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2dSame(out_ch, out_ch, 3, bias=False)
        if self.changes_width:
            self.nin_shortcut = Conv2dSame(out_ch, out_ch, 1, bias=False)  # out -> out: it acts on h

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        residual = self.nin_shortcut(h) if self.changes_width else x  # the released quirk: x is dropped
        return h + residual


class DownLevel(nn.Module):
    def __init__(self, block_in: int, block_out: int, n_blocks: int, dropout: float, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(block_in, block_out, dropout))
            block_in = block_out
        self.downsample = downsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            h = blk(h)
        return F.avg_pool2d(h, kernel_size=2, stride=2) if self.downsample else h


class UpLevel(nn.Module):
    def __init__(self, block_in: int, block_out: int, n_blocks: int, dropout: float, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(block_in, block_out, dropout))
            block_in = block_out
        if upsample:
            self.upsample_conv = Conv2dSame(block_out, block_out, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            h = blk(h)
        if hasattr(self, "upsample_conv"):
            h = self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class Encoder(nn.Module):
    def __init__(self, hidden: int, mult: list[int], n_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        self.conv_in = Conv2dSame(3, hidden, 3, bias=False)
        in_mult = [1] + list(mult)
        self.down = nn.ModuleList(DownLevel(hidden * in_mult[i], hidden * mult[i], n_blocks, dropout,
                                            i != len(mult) - 1) for i in range(len(mult)))
        mid = hidden * mult[-1]
        self.mid = nn.ModuleList(ResnetBlock(mid, mid, dropout) for _ in range(n_blocks))
        self.norm_out = group_norm(mid)
        self.conv_out = Conv2dSame(mid, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] in [0, 1] -> [B, z, H/f, W/f]
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, hidden: int, mult: list[int], n_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        n = len(mult)
        block_in = hidden * mult[-1]
        self.conv_in = Conv2dSame(z_channels, block_in, 3)
        self.mid = nn.ModuleList(ResnetBlock(block_in, block_in, dropout) for _ in range(n_blocks))
        # up[i] works at level i (i = 0 is the full resolution); it is RUN from i = n-1 down to 0.
        self.up = nn.ModuleList(UpLevel(hidden * mult[min(i + 1, n - 1)], hidden * mult[i], n_blocks, dropout,
                                        i != 0) for i in range(n))
        self.norm_out = group_norm(hidden * mult[0])
        self.conv_out = Conv2dSame(hidden * mult[0], 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, h, w] -> [B, 3, H, W], unclamped
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Plain nearest neighbour (squared Euclidean, no normalisation) in the released addmm op order."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.commitment_cost = num_embeddings, embedding_dim, commitment_cost
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)

    def codes(self, z: torch.Tensor) -> torch.Tensor:  # [B, D, h, w] -> long [B, h, w]
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # [N, D]
        e_t = self.embedding.weight.t()  # [D, K]
        dist = torch.addmm(flat.pow(2.0).sum(dim=1, keepdim=True) + e_t.pow(2.0).sum(dim=0, keepdim=True),
                           flat, e_t, alpha=-2.0)  # [N, K]
        return torch.argmin(dist, dim=1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # long [B, h, w] -> [B, D, h, w]
        return self.embedding(codes).permute(0, 3, 1, 2)  # channels-last view, as released (exact numerics)


class MaskGITVQ(ImageTokenizer):
    """MaskGIT VQGAN as an ImageTokenizer (inference only: RAR keeps it frozen)."""

    name = "maskgit_vq"

    def __init__(self, hidden_channels: int = 128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, num_embeddings: int = 1024, dropout: float = 0.0,
                 commitment_cost: float = 0.25):
        super().__init__()
        self._config = dict(hidden_channels=hidden_channels, channel_mult=list(channel_mult),
                            num_res_blocks=num_res_blocks, z_channels=z_channels, num_embeddings=num_embeddings,
                            dropout=float(dropout), commitment_cost=float(commitment_cost))
        self.vocab_size = num_embeddings
        self.downsample = 2 ** (len(channel_mult) - 1)
        self.encoder = Encoder(hidden_channels, list(channel_mult), num_res_blocks, z_channels, dropout)
        self.decoder = Decoder(hidden_channels, list(channel_mult), num_res_blocks, z_channels, dropout)
        self.quantize = VectorQuantizer(num_embeddings, z_channels, commitment_cost)

    @classmethod
    def from_preset(cls, preset: str = "maskgit_1024", **overrides) -> "MaskGITVQ":
        return cls(**preset_config(preset, **overrides))

    @classmethod
    def from_official_config(cls, cfg: dict) -> "MaskGITVQ":
        return cls(**config_from_official(cfg))

    def config(self) -> dict:
        return copy.deepcopy(self._config)

    @staticmethod
    def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float() / 255.0

    @staticmethod
    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(x, 0.0, 1.0) * 255.0).to(torch.uint8)

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:  # long [B, h, w] -> [B, 3, H, W] in [0, 1]
        return torch.clamp(self.decoder(self.quantize.lookup(codes)), 0.0, 1.0)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.name, self.downsample)
        x = self.to_model_space(images.to(self.quantize.embedding.weight.device))
        return self.quantize.codes(self.encoder(x))

    @torch.no_grad()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        check_codes(codes, self.name, self.vocab_size)
        return self.to_pixels(self.decode_code(codes.to(self.quantize.embedding.weight.device).long()))


def build_maskgit_vq(path: str = "", preset: str | None = None, **config) -> MaskGITVQ:
    """Registry factory: random init when ``path`` is empty, else a local weights file (never a download)."""
    if not path:
        return MaskGITVQ.from_preset(preset or "maskgit_1024", **config)
    from lightning_modules.official.maskgit_vq import load_maskgit_vq

    return load_maskgit_vq(path, preset=preset, **config)


# registry.check_options: the option names (and preset) before anything is built; every preset has the same keys
build_maskgit_vq.check_options = lambda path="", preset=None, **config: preset_config(preset or "maskgit_1024",
                                                                                      **config)
