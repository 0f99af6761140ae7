"""TF32 (``trainer.tf32``, ``sample.tf32``; lightning_modules/tf32.py): on by default as in the official trainers and
samplers, held exactly for a training run's steps and for each generation, restored after, never touching the CPU's
oneDNN precision, and readable by Lightning inside (its CUDA accelerator and ThroughputMonitor ask
``torch.get_float32_matmul_precision()``, which raises once the legacy and newer TF32 APIs are mixed)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_module
from lightning_modules.tf32 import cuda_tf32, tf32_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def torch_defaults():
    """Every test starts from torch's defaults (cuBLAS IEEE, cuDNN TF32) and leaves them so."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    yield
    assert tf32_state() == (False, True), "a test left the TF32 flags changed"
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True


def test_the_scope_sets_both_flags_and_restores_what_was_there():
    mkldnn = torch.backends.mkldnn.matmul.fp32_precision
    with cuda_tf32(True):
        assert tf32_state() == (True, True) and torch.get_float32_matmul_precision() == "high"
        assert torch.backends.mkldnn.matmul.fp32_precision == mkldnn  # the CPU's matmuls are not switched
        with cuda_tf32(False):
            assert tf32_state() == (False, False) and torch.get_float32_matmul_precision() == "highest"
        assert tf32_state() == (True, True)
    assert tf32_state() == (False, True)
    with pytest.raises(KeyError), cuda_tf32(True):
        raise KeyError("an error inside")
    assert tf32_state() == (False, True)


def test_a_process_that_set_the_newer_api_gets_its_state_back_and_lightning_can_read_it():
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # a user's script on the newer API
    with pytest.raises(RuntimeError):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 - torch refuses the legacy read after that
    with cuda_tf32(False):
        assert tf32_state() == (False, False) and torch.get_float32_matmul_precision() == "highest"
    assert tf32_state() == (True, True) and torch.get_float32_matmul_precision() == "high"
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # back to the fixture's state, through the same API


def _spy_generations(monkeypatch) -> list:
    import lightning_modules.sampling as sampling

    seen, inner = [], sampling._generate

    def spy(model, labels, settings, *args):
        seen.append((settings.tf32, tf32_state()))
        return inner(model, labels, settings, *args)

    monkeypatch.setattr(sampling, "_generate", spy)
    return seen


@pytest.mark.parametrize("tf32", [True, False])
def test_a_generation_runs_under_its_own_setting_and_only_it(monkeypatch, tf32):
    seen = _spy_generations(monkeypatch)
    m = make_module("arpg")
    with cuda_tf32(not tf32):  # the opposite outside: the generation's own setting must win, then come back
        m.sample_codes(torch.tensor([0, 1]), seed=0, num_steps=4, tf32=tf32)
        assert tf32_state() == (not tf32, not tf32)
    assert seen == [(tf32, (tf32, tf32))]
    assert m.sample_settings().tf32 is True  # the default: the official samplers' setting


def test_sample_file_names_say_when_tf32_is_off():
    from experiments.sample import knob_name

    m = make_module("raster")
    assert "tf32" not in knob_name(m, m.sample_settings(), 0, 8)
    assert knob_name(m, m.sample_settings(tf32=False), 0, 8).endswith("_official_notf32_seed0_n8")


@pytest.mark.parametrize("trainer_tf32,sample_tf32", [(False, True), (True, False)])
def test_a_training_run_holds_trainer_tf32_and_its_sampling_events_sample_tf32(tmp_path, monkeypatch, trainer_tf32,
                                                                                sample_tf32):
    """Training steps under trainer.tf32, every sampling callback (grid, order map, FID) under sample.tf32, and the
    process's flags as they were once the run returns."""
    import lightning as L

    import experiments.build as build
    from conftest import EVERY_CALLBACK
    from test_train import cfg_for

    steps, seen = [], _spy_generations(monkeypatch)

    class Spy(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(tf32_state())

    make = build.build_callbacks
    monkeypatch.setattr(build, "build_callbacks", lambda *a, **k: [*make(*a, **k), Spy()])
    from experiments.train import run

    cfg = cfg_for(tmp_path, "randar", "trainer.max_steps=2", *EVERY_CALLBACK, "eval.fid_num_samples=10",
                  f"trainer.tf32={str(trainer_tf32).lower()}", f"sample.tf32={str(sample_tf32).lower()}")
    result = run(cfg, quiet=True)
    assert result["steps"] == 2 and steps == [(trainer_tf32, trainer_tf32)] * 2
    assert len(seen) >= 3 and set(seen) == {(sample_tf32, (sample_tf32, sample_tf32))}  # grid, order map, FID
    recorded = json.load(open(tmp_path / result["run"] / "metrics.json"))
    assert recorded["run"] == result["run"]
    config = (tmp_path / result["run"] / "config.yaml").read_text()
    assert f"tf32: {str(trainer_tf32).lower()}" in config and f"tf32: {str(sample_tf32).lower()}" in config


def test_bench_records_its_tf32_and_samples_under_it(tmp_path, monkeypatch):
    from experiments.bench import main as bench_main

    seen = _spy_generations(monkeypatch)
    out = tmp_path / "s.json"
    assert bench_main(["sample", "--size", "debug", "--grid", "4", "--vocab", "32", "--repeat", "1", "--warmup", "0",
                       "--peak-sizes", "64", "--no-sweep", "--batch", "1", "--draws", "multinomial", "--threads", "1",
                       "--variants", "arpg", "--cfgs", "1", "--nocache", "off", "--tf32", "off",
                       "--out", str(out)]) == 0
    assert json.load(open(out))["tf32"] == "off"
    assert seen and set(seen) == {(False, (False, False))}


def test_scores_extract_features_in_ieee_fp32_inside_any_tf32_scope(monkeypatch):
    """FID / IS / class-consistency features: IEEE fp32 whatever the run's TF32 (the val/fid a training run logs
    inside trainer.tf32 equals experiments.evaluate's score outside it; no score depends on the GPU generation)."""
    from lightning_modules.metrics.extractors import DigitsCNN

    cnn, seen = DigitsCNN(), []
    inner = DigitsCNN._features_and_logits

    def spy(self, images):
        seen.append(tf32_state())
        return inner(self, images)

    monkeypatch.setattr(DigitsCNN, "_features_and_logits", spy)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with cuda_tf32(True):
        feats, logits = cnn.features_and_logits(images)
        assert tf32_state() == (True, True)
    cnn.features(images)
    assert seen == [(False, False)] * 2 and feats.shape == (2, cnn.num_features) and logits.shape == (2, 10)


def test_tokenizers_encode_and_decode_in_ieee_fp32_inside_any_tf32_scope(monkeypatch):
    """The codes of an image do not depend on the path that made them (pretokenize, or data.kind=images inside a
    run's TF32 scope, where a quantizer's argmin could flip), nor a sample's pixels on who decoded it."""
    from tokenizers.pixel import PixelTokenizer

    tok, seen = PixelTokenizer(), []
    for name in ("_encode", "_decode"):
        inner = getattr(PixelTokenizer, name)
        monkeypatch.setattr(PixelTokenizer, name,
                            lambda self, x, inner=inner: seen.append(tf32_state()) or inner(self, x))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with cuda_tf32(True):
        codes = tok.encode(images)
        back = tok.decode(codes)
        assert tf32_state() == (True, True)
    assert seen == [(False, False)] * 2 and back.shape == images.shape and back.dtype == torch.uint8


@pytest.mark.parametrize("tf32", [True, False])
def test_train_tokenizer_steps_run_under_train_tf32(tmp_path, monkeypatch, tf32):
    """``experiments.train_tokenizer``'s ``train.tf32`` (default on, as LlamaGen's VQ trainer) holds for its
    training steps; its validation's encode / decode stay IEEE (tokenizers/base.py)."""
    from experiments.train_tokenizer import main
    from lightning_modules.tokenizer import VQTokenizerModule

    steps, inner = [], VQTokenizerModule.training_step
    monkeypatch.setattr(VQTokenizerModule, "training_step",
                        lambda self, *a: steps.append(tf32_state()) or inner(self, *a))
    sets = ["--set", "train.extractor=none", "--set", "tokenizer.vq.codebook_size=16"]
    config = os.path.join(REPO, "experiments/configs/tokenizer/digits_vq.yaml")
    main(["--out", str(tmp_path / "vq"), "-c", config, "--max-steps", "2", "--batch-size", "8", *sets,
          *([] if tf32 else ["--set", "train.tf32=false"])])
    assert steps == [(tf32, tf32)] * 2
