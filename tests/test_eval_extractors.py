"""Feature extractors: offline Inception loading, the missing-weights error, the digits CNN and FID ordering."""
import json
import os

import numpy as np
import pytest
import torch

import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from datamodules.digits import digits_arrays
from lightning_modules.metrics.extractors import (DigitsCNN, load_extractor, save_digits_extractor,
                                                  train_digits_extractor)
from lightning_modules.metrics.reference import extract_stats, resolve_reference
from lightning_modules.metrics.scores import fid_from_stats


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to fetch Inception weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args[:1]}")
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    model, info = train_digits_extractor(seed=0, epochs=8)           # ~1.5 s; val acc ~0.97
    path = str(tmp_path_factory.mktemp("ext") / "digits.safetensors")
    save_digits_extractor(model, path, info)
    return path, info


@pytest.mark.parametrize("path", ["", None, "/nonexistent/inception.pth"])
def test_missing_inception_weights_names_the_config_key(no_download, path):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_extractor("inception", path)
    msg = str(e.value)
    assert "eval.inception_weights" in msg and "\n" not in msg
    if path:
        assert path in msg


def test_bad_extractor_kind_and_missing_digits_file(tmp_path):
    with pytest.raises(ValueError, match="unknown extractor kind 'vgg'"):
        load_extractor("vgg", "x")
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="train_extractor") as e:
        load_extractor("digits", missing)
    assert missing in str(e.value)


def test_digits_extractor_roundtrip_and_determinism(digits_weights, tmp_path):
    path, info = digits_weights
    assert info["val_accuracy"] > 0.9
    sidecar = json.load(open(os.path.splitext(path)[0] + ".json"))
    assert sidecar["val_accuracy"] == info["val_accuracy"] and sidecar["config"]["num_features"] == 64
    ext = load_extractor("digits", path)
    assert ext.name.startswith("digits-cnn-") and ext.num_features == 64 and ext.num_classes == 10
    # same seed -> bit-identical weights -> the same name (cache key)
    again = str(tmp_path / "again.safetensors")
    model, info2 = train_digits_extractor(seed=0, epochs=8)
    save_digits_extractor(model, again, info2)
    assert load_extractor("digits", again).name == ext.name
    # any size / channel count: uint8 [B, 3, 16, 16] is resized to 8x8 grey
    imgs = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    f, logits = ext.features_and_logits(imgs)
    assert f.shape == (4, 64) and logits.shape == (4, 10)
    assert torch.equal(ext.features(imgs), f) and torch.equal(ext(imgs), f)
    ext.train()
    assert not ext.training                                          # never leaves eval mode
    with pytest.raises(ValueError, match="uint8"):
        ext.features(imgs.float())


def test_fid_grows_with_corruption(digits_weights):
    """FID against the digits train split rises monotonically with noise on the val images (val != train)."""
    ext = load_extractor("digits", digits_weights[0])
    ref = resolve_reference("digits", ext)
    xva, _ = digits_arrays("val")                                   # uint8 [359, 8, 8]
    rng = np.random.default_rng(0)
    fids = []
    for level in (0.0, 0.25, 0.5, 1.0):
        noisy = np.clip(xva + level * 255.0 * rng.standard_normal(xva.shape), 0, 255).astype(np.uint8)
        stats, _ = extract_stats(ext, [noisy])
        fids.append(fid_from_stats(stats["mu"], stats["sigma"], ref.mu, ref.sigma))
    print("FID at noise 0/0.25/0.5/1.0:", [round(f, 2) for f in fids])
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[-1] > 5 * fids[0]


def _random_inception_file(path: str, monkeypatch) -> None:
    """torch-fidelity's InceptionV3 layout with random init, built without loading (or downloading) anything."""
    with monkeypatch.context() as m:
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_inception_runs_offline_from_a_local_file(tmp_path, no_download, monkeypatch):
    path = str(tmp_path / "inception_random.pth")
    _random_inception_file(path, monkeypatch)                       # the no_download guard is back after this
    assert len(torch.load(path)) == 566
    ext = load_extractor("inception", path)
    assert ext.name.startswith("inception-v3-compat-") and ext.num_features == 2048
    imgs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    feats, logits = ext.features_and_logits(imgs)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)   # pool3 + ADM's bias-free 1008-way logits
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="eval.inception_weights.*not a torch-fidelity"):
        load_extractor("inception", str(tmp_path / "bad.pth"))


def test_untrained_digits_cnn_name():
    assert DigitsCNN().name == "digits-cnn-untrained"


def test_fid_agrees_with_torchmetrics_on_the_same_extractor(digits_weights):
    """Our scipy-sqrtm path and torchmetrics' eigenvalue path agree (the extractor plugs in as ``feature=``)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = load_extractor("digits", digits_weights[0])
    xtr, _ = digits_arrays("train")
    xva, _ = digits_arrays("val")
    real = torch.from_numpy(xtr[:400])[:, None].expand(-1, 3, -1, -1)
    fake = torch.from_numpy(np.clip(xva * 0.7 + 40, 0, 255).astype(np.uint8))[:, None].expand(-1, 3, -1, -1)
    tm = FrechetInceptionDistance(feature=ext, normalize=False)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ours_real, _ = extract_stats(ext, [real])
    ours_fake, _ = extract_stats(ext, [fake])
    ours = fid_from_stats(ours_fake["mu"], ours_fake["sigma"], ours_real["mu"], ours_real["sigma"])
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)
