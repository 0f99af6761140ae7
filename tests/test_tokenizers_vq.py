"""LlamaGen VQ and MaskGIT VQGAN: protocol shapes/ranges, official parity fixtures, STE gradients, l2 codebook."""
from __future__ import annotations

import pytest
import torch

from conftest import parity_fixture
from tokenizers.maskgit_vq import MaskGITVQ
from tokenizers.registry import build_tokenizer
from tokenizers.vq import LlamaGenVQ


pytestmark = pytest.mark.usefixtures("one_thread")


def fixture(name: str) -> dict:
    return torch.load(parity_fixture(f"{name}.pt"), weights_only=True)


def random_pixels(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("kind,preset,size,grid,vocab", [
    ("llamagen_vq", "tiny", 32, 4, 256), ("digits_vq", None, 32, 8, 128), ("maskgit_vq", "tiny", 32, 2, 64)])
def test_encode_decode_shapes_and_ranges(kind, preset, size, grid, vocab):
    tok = build_tokenizer(kind, **({"preset": preset} if preset else {}))
    assert not tok.training and tok.vocab_size == vocab and tok.grid(size, size) == (grid, grid)
    images = random_pixels(2, size)
    codes = tok.encode(images)
    assert codes.dtype == torch.long and codes.shape == (2, grid, grid)
    assert int(codes.min()) >= 0 and int(codes.max()) < vocab
    out = tok.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, size, size)
    assert len(tok.fingerprint) == 16 and tok.config()  # config is plain data for manifests and checkpoints
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(images.float())
    with pytest.raises(ValueError, match=r"\[2, 1, 32, 32\]"):
        tok.encode(images[:, :1])
    with pytest.raises(ValueError, match="not divisible"):
        tok.encode(random_pixels(1, size + 2))
    with pytest.raises(ValueError, match=f"outside \\[0, {vocab}\\)"):
        tok.decode(torch.full((1, grid, grid), vocab))


def test_pixel_mapping_matches_release():
    x = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    assert torch.allclose(LlamaGenVQ.to_model_space(x), torch.tensor([-1.0, -1 / 255, 1 / 255, 1.0]), atol=1e-6)
    # 127.5 x + 128, clamped, truncating cast: -1 -> 0 (clamped from 0.5), 1 -> 255 (clamped from 255.5)
    assert LlamaGenVQ.to_pixels(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]
    assert MaskGITVQ.to_pixels(torch.tensor([-0.5, 0.5, 1.0, 3.0])).tolist() == [0, 127, 255, 255]


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_llamagen_vq_parity(size):
    fx = fixture(f"llamagen_vq_{size}")
    tok = LlamaGenVQ(**fx["config"]).eval()
    tok.load_state_dict(fx["state_dict"], strict=True)
    pixels, out = fx["inputs"]["pixels"], fx["outputs"]
    with torch.no_grad():
        pre = tok.pre_quant(tok.to_model_space(pixels))
        assert (pre - out["pre_quant"]).abs().max() <= 1e-4
        codes = tok.encode(pixels)
        assert torch.equal(codes.flatten(1), out["codes"])  # margin: out["min_code_margin"]
        quant, _, _ = tok.quantize(pre)
        assert (quant - out["quant"]).abs().max() <= 1e-4
        decoded = tok.decode_code(out["codes"].view(codes.shape))
        assert (decoded - out["decoded_from_codes"]).abs().max() <= 1e-4
        if "reconstruction" in out:
            assert (tok(tok.to_model_space(pixels))[0] - out["reconstruction"]).abs().max() <= 1e-4
        # uint8 path: the truncating cast may flip one level where a value sits on an integer boundary
        pixels_out = tok.decode(codes).int() - LlamaGenVQ.to_pixels(out["decoded_from_codes"]).int()
        assert pixels_out.abs().max() <= 1


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_maskgit_vq_parity(size):
    fx = fixture(f"maskgit_vq_{size}")
    tok = MaskGITVQ.from_official_config(fx["config"]).eval()
    tok.load_state_dict(fx["state_dict"], strict=True)
    pixels, out = fx["inputs"]["pixels"], fx["outputs"]
    with torch.no_grad():
        assert (tok.encoder(tok.to_model_space(pixels)) - out["pre_quant"]).abs().max() <= 1e-4
        codes = tok.encode(pixels)
        assert torch.equal(codes.flatten(1), out["codes"])
        decoded = tok.decode_code(out["codes"].view(codes.shape))
        assert (decoded - out["decoded"]).abs().max() <= 1e-4 and decoded.min() >= 0 and decoded.max() <= 1
        if "decoded_unclamped" in out:
            raw = tok.decoder(tok.quantize.lookup(codes))
            assert (raw - out["decoded_unclamped"]).abs().max() <= 1e-4
        assert (tok.decode(codes).int() - MaskGITVQ.to_pixels(out["decoded"]).int()).abs().max() <= 1


def test_maskgit_nin_shortcut_quirk_drops_the_input():
    from tokenizers.maskgit_vq import ResnetBlock

    blk = ResnetBlock(32, 64).eval()
    x = torch.randn(1, 32, 4, 4)
    h = blk.conv2(blk.dropout(torch.nn.functional.silu(blk.norm2(blk.conv1(torch.nn.functional.silu(blk.norm1(x)))))))
    assert torch.allclose(blk(x), h + blk.nin_shortcut(h), atol=1e-6)
    assert blk.nin_shortcut.weight.shape == (64, 64, 1, 1) and blk.nin_shortcut.bias is None


def test_straight_through_gradients_reach_encoder():
    torch.manual_seed(0)
    tok = LlamaGenVQ.from_preset("tiny").train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, losses, codes = tok(x)
    assert set(losses) == {"codebook", "commit", "entropy"} and codes.shape == (2, 4, 4)
    rec.pow(2).mean().backward()  # reconstruction only: the encoder is reached only through the STE
    grad = tok.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad is None  # the codebook gets no reconstruction gradient
    tok.zero_grad()
    _, losses, _ = tok(x)
    losses["codebook"].backward()
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0 and tok.encoder.conv_in.weight.grad is None
    assert int((tok.quantize.codebook_used != 0).sum()) > 0  # the usage ring records training codes


def test_entropy_term_is_active_only_when_enabled():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert LlamaGenVQ.from_preset("tiny").train()(x)[1]["entropy"] == 0
    e = LlamaGenVQ.from_preset("tiny", entropy_loss_ratio=0.1).train()(x)[1]["entropy"]
    assert e != 0 and torch.isfinite(e)


def test_codebook_unit_norm_when_l2_on():
    tok = LlamaGenVQ.from_preset("tiny")
    with torch.no_grad():
        tok.quantize.embedding.weight.mul_(3.0)  # raw rows off the sphere: lookup must still normalise
    norms = tok.quantize.codebook().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    vectors = tok.quantize.lookup(torch.zeros(1, 2, 2, dtype=torch.long))  # [1, D, 2, 2]
    assert torch.allclose(vectors.norm(dim=1), torch.ones(1, 2, 2), atol=1e-5)
    off = LlamaGenVQ.from_preset("tiny", codebook_l2_norm=False)
    with torch.no_grad():
        off.quantize.embedding.weight.mul_(3.0)
    assert not torch.allclose(off.quantize.codebook().norm(dim=-1), torch.ones(256), atol=1e-3)


def test_presets_and_options_are_checked():
    with pytest.raises(ValueError, match="unknown LlamaGen VQ preset 'nope'"):
        LlamaGenVQ.from_preset("nope")
    with pytest.raises(ValueError, match="tokenizer.codebok_size"):
        LlamaGenVQ.from_preset("tiny", codebok_size=3)
    with pytest.raises(ValueError, match="multiple of the 32 GroupNorm"):
        LlamaGenVQ.from_preset("tiny", ch=16)
    with pytest.raises(ValueError, match="unknown tokenizer 'vqq'"):
        build_tokenizer("vqq")
    with pytest.raises(ValueError, match=r"^tokenizer.options.foo: not an option of the pixel tokenizer \(it takes "
                                         r"levels\)$"):  # was a TypeError from the constructor
        build_tokenizer("pixel", foo=1)
    with pytest.raises(ValueError, match=r"^tokenizer.options.bar: .* codes tokenizer \(it takes vocab_size, "):
        build_tokenizer("codes", vocab_size=4, bar=1)
    from tokenizers.registry import check_options

    for kind in ("llamagen_vq", "digits_vq", "maskgit_vq"):  # **config factories: named before anything is built
        with pytest.raises(ValueError, match=r"^tokenizer.options.codebok_size: not a .* option"):
            check_options(kind, path="any.safetensors", codebok_size=3)
        check_options(kind, preset="tiny")
