"""experiments.import_official and experiments.checkpoints: released key sets, strict errors that name the culprit,
the official sampling defaults per size, round trips (.pt and .safetensors) with identical logits, Lightning .ckpt."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os

import pytest
import torch

from conftest import make_module, parity_fixture
from experiments import import_official as imp
from experiments.checkpoints import load_generator, load_weights_into
from lightning_modules.official.generators import build_generator, family_module, official_state_dict
from lightning_modules.official.parity import build_official_generator
from tokenizers.base import TokenizerMismatchError

FAMILIES = ("llamagen_gpt", "randar", "arpg", "rar")
MANIFEST = {"llamagen_gpt": ("llamagen_gpt_L", "L"), "randar": ("randar_L", "L"), "arpg": ("arpg_L", "L"),
            "rar": ("rar_B", "B")}  # VQ entries: tests/test_official_vq.py


def fixture(name: str) -> dict:
    return torch.load(parity_fixture(f"{name}.pt"), weights_only=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_released_config_has_the_official_key_set(family):
    entry, size = MANIFEST[family]
    with open(parity_fixture("manifest_full_size.json")) as f:
        ref = json.load(f)[entry]
    module = build_generator(family, family_module(family).official_config(size), device="meta")
    ours = official_state_dict(module, family)
    shapes = {k: list(v.shape) for k, v in ours.items()}
    assert sorted(set(shapes) - set(ref["keys"])) == [] and sorted(set(ref["keys"]) - set(shapes)) == []
    assert shapes == ref["keys"]
    assert sum(v.numel() for v in ours.values()) == ref["num_params"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_released_size_is_recognised_from_its_weights(family):
    fam = family_module(family)
    for size in fam.RELEASES:
        module = build_generator(family, fam.official_config(size), device="meta")
        assert fam.infer_size(official_state_dict(module, family)) == size
        assert imp.preset_size(family, f"{fam.NAME_PREFIXES[0]}-{size.lower()}") == size
        assert imp.preset_size(family, size) == size  # a bare size too ("XL" once read as prefix "x" + size "l")


# ------------------------------------------------------------------ official sampling defaults per released size
class StubBackbone(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.num_positions, self.num_classes, self.w = n, 10, torch.nn.Parameter(torch.zeros(1))

    def new_cache(self, *args, **kwargs):
        return None

    def forward(self, shape, cache):
        return torch.zeros(*shape, 3)  # [B2, n, V]: every scale is recorded, the logits do not matter


class Stub:
    """Just enough for generate(): zero logits, the real ordering's decode plan and CFG count rule."""

    def __init__(self, variant: str, n=256):
        from lightning_modules.variants import build_ordering

        side = math.isqrt(n)
        self.backbone = StubBackbone(n)
        self.ordering = build_ordering(variant, (side, side))
        self.ordering.decode_step = lambda state, k: (state.labels.shape[0], k)  # the stub backbone's "Seq"


def default_scales(family: str, size: str) -> list[float]:
    from lightning_modules.sampling import SampleSettings, generate

    section = imp.sample_section(family, size, 256)
    fields = SampleSettings.__dataclass_fields__
    settings = SampleSettings(**{"num_steps": 256, **{k: v for k, v in section.items() if k in fields}})
    variant = build_generator(family, family_module(family).official_config(size),
                              device="meta").hparams.model["variant"]
    rec = []
    generate(Stub(variant), torch.tensor([1, 2]), settings, torch.Generator().manual_seed(0),
             draw=lambda logits, pos: torch.zeros_like(pos), recorder=rec.append)
    return [r["cfg_scale"] for r in rec], settings


def test_imported_sampling_defaults_reproduce_the_official_schedules():
    with open(parity_fixture("schedules.json")) as f:
        ref = json.load(f)
    for size in ("L", "XL"):
        scales, s = default_scales("randar", size)
        assert (s.num_steps, s.schedule, s.cfg_start, s.cfg_scale) == (88, "randar_cosine", 1.0, 4.0)
        assert scales == ref["randar_cfg_linear"]["scale"]  # linear 1 -> 4 on the count BEFORE each step
    scales, s = default_scales("arpg", "L")
    assert (s.num_steps, s.schedule, s.cfg_scale) == (64, "arccos", 5.0)
    assert scales == ref["arpg_cfg_linear"]["scale"]  # linear on the count INCLUDING each step
    assert [default_scales("arpg", z)[0][-1] for z in ("XL", "XXL")] == [6.0, 7.5]
    for size, key, temperature in (("B", "g16.0_pow2.75", 1.0), ("XL", "g6.9_pow1.5", 1.02)):
        scales, s = default_scales("rar", size)
        assert scales == ref["rar_guidance_pow_cosine"][key] and s.temperature == temperature
        assert s.schedule == "one_per_step" and s.num_steps == 256
    assert imp.sample_section("rar", "L", 256)["cfg_scale"] == 15.5
    assert imp.sample_section("rar", "XXL", 256)["cfg_power"] == 1.2
    for size, g in (("B", 2.0), ("L", 2.0), ("XL", 1.75), ("XXL", 1.75)):
        scales, s = default_scales("llamagen_gpt", size)
        assert s.cfg_schedule == "constant" and set(scales) == {g}


# ------------------------------------------------------------------ round trips
def import_cli(*argv) -> int:
    return imp.main([str(a) for a in argv])


def save_official(fx: dict, tmp_path, fmt: str, name: str = "official") -> str:
    if fmt == "pt":
        path = str(tmp_path / f"{name}.pt")
        torch.save({"model": fx["state_dict"], "steps": 10}, path)
    else:
        from safetensors.torch import save_file

        path = str(tmp_path / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in fx["state_dict"].items()}, path)
    return path


def write_config(fx: dict, tmp_path) -> str:
    path = str(tmp_path / "config.json")
    with open(path, "w") as f:
        json.dump(fx["config"], f)
    return path


def forward(module, fx):
    tokens, labels = fx["inputs"]["tokens"], fx["inputs"]["class_labels"]
    n = tokens.shape[1]
    order = fx["inputs"].get("token_order", torch.arange(n).expand(tokens.shape[0], -1))
    with torch.no_grad():
        return module.backbone(module.ordering.train_inputs(tokens, labels, 0, None, order=order)[0])


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("family", FAMILIES)
def test_import_round_trip_gives_identical_logits(tmp_path, family, fmt):
    fx = fixture(f"{family}_tiny")
    src, out = save_official(fx, tmp_path, fmt), tmp_path / "out"
    assert import_cli("--family", family, "--ckpt", src, "--config", write_config(fx, tmp_path), "--out", out) == 0
    meta = json.loads((out / "roar.json").read_text())
    with open(src, "rb") as f:
        assert meta["official"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["family"] == family and meta["tokenizer"]["build"] == {"kind": "codes", "vocab_size": 64}
    defaults = family_module(family).SAMPLE_DEFAULTS  # N = 16 here: the 88 / 64 steps are left to the ordering
    assert meta["sample"] == {k: v for k, v in defaults.items() if k != "num_steps"}
    reference = forward(build_official_generator(fx), fx)
    for path in (out, out / "model.safetensors"):
        assert torch.equal(forward(load_generator(path), fx), reference)
    if family != "rar":  # RAR's file logits have one more slot; its parity is covered by the fixture test
        assert (reference - fx["outputs"]["logits"]).abs().max() <= 1e-5
    lone = tmp_path / "lone"  # the JSON embedded in the safetensors metadata is enough on its own
    lone.mkdir()
    os.replace(out / "model.safetensors", lone / "weights.safetensors")
    assert torch.equal(forward(load_generator(lone / "weights.safetensors"), fx), reference)


def test_pickled_namespace_is_refused_without_unpickling(tmp_path, capsys, monkeypatch):
    fx = fixture("randar_tiny")
    path = tmp_path / "c2i.pt"
    torch.save({"model": fx["state_dict"], "args": argparse.Namespace(lr=1e-4)}, path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    assert import_cli("--family", "randar", "--ckpt", path, "--config", write_config(fx, tmp_path),
                      "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "refusing to unpickle" in err and "save_file" in err  # the conversion one-liner
    assert calls and all(w is True for w in calls)  # never weights_only=False
    assert not (tmp_path / "o" / "model.safetensors").exists()


# ------------------------------------------------------------------ mismatches name the culprit
def broken(fx, drop=(), add=None, reshape=None) -> dict:
    sd = {k: v for k, v in fx["state_dict"].items() if k not in drop}
    if add:
        sd.update(add)
    for key, shape in (reshape or {}).items():
        sd[key] = torch.zeros(shape)
    return {**fx, "state_dict": sd}


@pytest.mark.parametrize("family,edit,expect", [
    ("randar", dict(drop=["pos_instruct_embeddings"]), ["1 missing keys", "pos_instruct_embeddings"]),
    ("llamagen_gpt", dict(reshape={"output.weight": (65, 64)}), ["output.weight", "[65, 64]", "[64, 64]"]),
    ("arpg", dict(drop=["layers.self_dec.0.attn.to_k.weight"]), ["layers.self_dec.0.attn.to_k.weight"]),
    ("rar", dict(add={"blocks.9.attn.qkv.weight": torch.zeros(3)}), ["unexpected", "blocks.9.attn.qkv.weight"]),
])
def test_mismatched_checkpoint_is_refused_naming_the_key(tmp_path, capsys, family, edit, expect):
    fx = fixture(f"{family}_tiny")
    src = save_official(broken(fx, **edit), tmp_path, "pt")
    assert import_cli("--family", family, "--ckpt", src, "--config", write_config(fx, tmp_path),
                      "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(e in err for e in expect), err


def test_unknown_preset_and_unrecognised_weights_are_refused(tmp_path, capsys):
    src = save_official(fixture("arpg_tiny"), tmp_path, "pt")
    assert import_cli("--family", "arpg", "--ckpt", src, "--config", "ARPG-B", "--out", tmp_path / "o") == 2
    assert "ARPG-B" in capsys.readouterr().err
    assert import_cli("--family", "arpg", "--ckpt", src, "--out", tmp_path / "o") == 2
    assert "no released arpg size" in capsys.readouterr().err
    assert import_cli("--family", "arpg", "--ckpt", src, "--config", "ARPG-L", "--out", tmp_path / "o") == 2
    assert "embeddings.weight: file [77, 64] vs model [17387, 1024]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory):
    """A llamagen_vq tokenizer imported from the tiny VQ fixture (vocabulary 64)."""
    fx = fixture("llamagen_vq_tiny")
    tmp = tmp_path_factory.mktemp("vq")
    src = save_official(fx, tmp, "pt", "vq")
    assert import_cli("--family", "llamagen_vq", "--ckpt", src, "--config", write_config(fx, tmp),
                      "--out", tmp / "tok") == 0
    return fx, tmp / "tok"


def test_tokenizer_import_is_usable_by_kind_and_path(vq_folder):
    from tokenizers.registry import build_tokenizer

    fx, folder = vq_folder
    tok = build_tokenizer("llamagen_vq", path=str(folder / "tokenizer.safetensors"))
    codes = tok.encode(fx["inputs"]["pixels"]).flatten(1)
    assert torch.equal(codes, fx["outputs"]["codes"])
    meta = json.loads((folder / "roar.json").read_text())
    assert meta["vocab_size"] == 64 and meta["fingerprint"] == tok.fingerprint


def test_generator_with_a_matching_tokenizer(tmp_path, vq_folder):
    fx = fixture("llamagen_gpt_tiny")  # vocabulary 64 = the tiny VQ's codebook
    src = save_official(fx, tmp_path, "pt")
    _, folder = vq_folder
    assert import_cli("--family", "llamagen_gpt", "--ckpt", src, "--config", write_config(fx, tmp_path),
                      "--tokenizer-path", folder, "--out", tmp_path / "o") == 0
    module = load_generator(tmp_path / "o")
    assert module.tokenizer.name == "llamagen_vq" and module.tokenizer.vocab_size == 64


def test_tokenizer_vocabulary_mismatch_is_refused(tmp_path, capsys, vq_folder):
    tiny = fixture("llamagen_gpt_tiny")  # vocabulary 64, as the tiny VQ: grow it to 256 (the tiny set runs this)
    sd = dict(tiny["state_dict"])
    for key in ("tok_embeddings.weight", "output.weight"):
        sd[key] = sd[key].repeat(4, 1)
    fx = {**tiny, "state_dict": sd, "config": {**tiny["config"], "vocab_size": 256}}
    src = save_official(fx, tmp_path, "pt")
    _, folder = vq_folder
    assert import_cli("--family", "llamagen_gpt", "--ckpt", src, "--config", write_config(fx, tmp_path),
                      "--tokenizer-path", folder, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "vocabulary mismatch" in err and "64" in err and "256" in err


# ------------------------------------------------------------------ fine-tuning init and Lightning checkpoints
@pytest.fixture(scope="module")
def randar_import(tmp_path_factory):
    fx = fixture("randar_tiny")
    tmp = tmp_path_factory.mktemp("imp")
    src = save_official(fx, tmp, "safetensors")
    assert import_cli("--family", "randar", "--ckpt", src, "--config", write_config(fx, tmp), "--out", tmp / "o") == 0
    return fx, tmp / "o"


def test_load_weights_into_for_fine_tuning(randar_import):
    fx, folder = randar_import
    module = make_module("randar", vocab=64, num_classes=10, randomize=False)  # same architecture as the file
    load_weights_into(module, folder)
    assert torch.equal(forward(module, fx), forward(build_official_generator(fx), fx))
    with pytest.raises(ValueError, match="unexpected keys.*pos_instruct"):
        load_weights_into(make_module("raster", vocab=64, num_classes=10), folder)
    with pytest.raises(TokenizerMismatchError, match="vocabulary 64 .* 11"):
        load_weights_into(make_module("randar"), folder)  # vocabulary 11


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_lightning_checkpoint_round_trip(tmp_path):
    import lightning as L

    from lightning_modules.callbacks.ema import EMA

    module = make_module("arpg").train()
    data = [{"codes": torch.randint(0, 11, (4, 4)), "label": torch.tensor(i % 5)} for i in range(8)]
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[EMA(0.5)], accelerator="cpu",
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=4))
    path = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(path)
    loaded = load_generator(path)
    assert type(loaded).__name__ == "ARPGModule" and not loaded.training
    for name, p in module.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[name], p), name
    ema = load_generator(path, ema=True)
    assert not torch.equal(ema.backbone.output.weight, module.backbone.output.weight)
    fresh = make_module("arpg", randomize=False)
    load_weights_into(fresh, path)
    assert torch.equal(fresh.backbone.output.weight, module.backbone.output.weight)
    with pytest.raises(TokenizerMismatchError, match="vocabulary 11"):
        load_weights_into(make_module("arpg", vocab=12), path)
