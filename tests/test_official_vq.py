"""Official weight import: safe file reading, strict loading errors, safetensors round trip, released key sets."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import parity_fixture
from lightning_modules.official import llamagen_vq, maskgit_vq
from lightning_modules.official.checkpoint_io import (UnsafeCheckpointError, load_state_dict_file,
                                                       save_state_dict_file, save_tokenizer, strict_load)
from tokenizers.registry import build_tokenizer
from tokenizers.vq import LlamaGenVQ


pytestmark = pytest.mark.usefixtures("one_thread")


def manifest_entry(name: str) -> dict:
    with open(parity_fixture("manifest_full_size.json")) as f:
        return json.load(f)[name]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaGenVQ.from_preset("tiny").eval()


@pytest.mark.parametrize("entry,keys_fn", [("llamagen_vq16", llamagen_vq.official_keys),
                                            ("maskgit_vqgan_1024", maskgit_vq.official_keys)])
def test_released_configs_match_manifest_on_meta(entry, keys_fn):
    ref = manifest_entry(entry)
    ours = keys_fn()
    assert sorted(ours) == sorted(ref["keys"])
    assert {k: list(v) for k, v in ref["keys"].items()} == ours
    params = sum(torch.Size(s).numel() for k, s in ours.items() if not k.endswith("codebook_used"))
    assert params == ref["num_params"]
    # and a strict load of meta tensors with the manifest's shapes goes through
    with torch.device("meta"):
        model = (LlamaGenVQ.from_preset("vq16") if entry == "llamagen_vq16"
                 else maskgit_vq.MaskGITVQ.from_preset("maskgit_1024"))
        sd = {k: torch.empty(s) for k, s in ref["keys"].items()}
    strict_load(model, sd, entry)


def test_strict_load_names_missing_unexpected_and_shape(tiny):
    sd = dict(tiny.state_dict())
    del sd["quantize.embedding.weight"]
    sd["encoder.conv_in.weight"] = torch.zeros(7, 3, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    fresh = LlamaGenVQ.from_preset("tiny")
    before = fresh.encoder.conv_out.weight.clone()
    with pytest.raises(ValueError) as err:
        strict_load(fresh, sd, "my tokenizer")
    msg = str(err.value)
    assert msg.startswith("my tokenizer:") and "\n" not in msg
    assert "quantize.embedding.weight" in msg and "extra.weight" in msg
    assert "encoder.conv_in.weight: file [7, 3, 3, 3] vs model [32, 3, 3, 3]" in msg
    assert torch.equal(fresh.encoder.conv_out.weight, before)  # nothing was loaded partially


def test_pickled_namespace_is_refused_with_conversion_hint(tiny, tmp_path):
    path = str(tmp_path / "vq_ds16_c2i.pt")
    torch.save({"model": tiny.state_dict(), "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_state_dict_file(path)
    msg = str(err.value)
    assert path in msg and "argparse.Namespace" in msg and "\n" not in msg
    assert "weights_only=False" in msg and "save_file" in msg and "vq_ds16_c2i.safetensors" in msg
    with pytest.raises(UnsafeCheckpointError):
        build_tokenizer("llamagen_vq", path=path, preset="tiny")


def test_torch_checkpoint_sub_dicts_and_ema(tiny, tmp_path):
    sd = tiny.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    path = str(tmp_path / "ck.pt")
    torch.save({"model": sd, "ema": ema, "steps": 5}, path)
    assert torch.equal(load_state_dict_file(path)["quant_conv.weight"], sd["quant_conv.weight"])
    assert torch.equal(load_state_dict_file(path, prefer_ema=True)["quant_conv.weight"], ema["quant_conv.weight"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    assert set(load_state_dict_file(path)) == set(sd)  # DDP prefix stripped
    with pytest.raises(ValueError, match="no 'ema'"):
        load_state_dict_file(path, prefer_ema=True)
    tok = llamagen_vq.load_llamagen_vq(path, preset="tiny")
    assert torch.equal(tok.quant_conv.weight, sd["quant_conv.weight"]) and not tok.training


def test_missing_file_names_it(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_tokenizer("maskgit_vq", path=path)
    bad = tmp_path / "junk.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.bin"):
        load_state_dict_file(str(bad))


def test_safetensors_round_trip_with_embedded_config(tiny, tmp_path):
    with torch.no_grad():
        tiny.quantize.codebook_used[:3] = torch.tensor([5.0, 6.0, 7.0])
    weights, info = save_tokenizer(tiny, str(tmp_path), kind="llamagen_vq")
    meta = json.load(open(info))
    assert meta["kind"] == "llamagen_vq" and meta["config"] == tiny.config()
    assert meta["fingerprint"] == tiny.fingerprint
    # no preset given: the architecture comes from the file; fingerprint (config + every tensor) survives
    loaded = build_tokenizer("llamagen_vq", path=weights)
    assert loaded.config() == tiny.config() and loaded.fingerprint == tiny.fingerprint
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(loaded.encode(images), tiny.encode(images))
    with pytest.raises(ValueError, match="codebook_size"):
        build_tokenizer("llamagen_vq", path=weights, codebook_size=1024)
    with pytest.raises(ValueError, match="'llamagen_vq' tokenizer"):
        build_tokenizer("maskgit_vq", path=weights)
    # a bare safetensors state dict (no roar metadata) uses the preset, strictly
    bare = str(tmp_path / "bare.safetensors")
    save_state_dict_file(bare, tiny.state_dict())
    assert llamagen_vq.load_llamagen_vq(bare, preset="tiny").fingerprint == tiny.fingerprint
    with pytest.raises(ValueError, match="shape mismatches"):
        llamagen_vq.load_llamagen_vq(bare, preset="tiny", codebook_size=64)


def test_maskgit_load_from_safetensors(tmp_path):
    torch.manual_seed(0)
    tok = maskgit_vq.MaskGITVQ.from_preset("tiny").eval()
    path = str(tmp_path / "maskgit.safetensors")
    save_state_dict_file(path, tok.state_dict())
    loaded = maskgit_vq.load_maskgit_vq(path, preset="tiny")
    assert loaded.fingerprint == tok.fingerprint
    with pytest.raises(ValueError, match="maskgit_vq weights .*missing keys"):
        maskgit_vq.load_maskgit_vq(path, preset="tiny", num_res_blocks=3)
