"""experiments.evaluate and experiments.train_extractor end to end on tiny inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from datamodules.digits import digits_arrays
from experiments import evaluate, train_extractor
from lightning_modules.metrics.reference import extract_stats
from lightning_modules.metrics.extractors import load_extractor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ext") / "digits.safetensors")
    info = train_extractor.main(["--out", out, "--epochs", "4"])
    assert os.path.isfile(out) and os.path.isfile(out.replace(".safetensors", ".json"))
    assert 0.5 < info["val_accuracy"] <= 1.0
    return out


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    x, _ = digits_arrays("val")
    arr = np.repeat(x[:120, :, :, None], 3, axis=-1)                 # uint8 [120, 8, 8, 3], ADM NHWC
    path = str(tmp_path_factory.mktemp("samples") / "samples.npz")
    np.savez(path, arr_0=arr)
    return path, arr


def test_evaluate_npz_end_to_end(tmp_path, weights, samples, capsys):
    out = str(tmp_path / "m" / "metrics.json")
    m = evaluate.main(["--samples", samples[0], "--ref", "digits", "--extractor", "digits",
                       "--extractor-weights", weights, "--out", out, "--batch-size", "32"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("fid=") and "n=120" in line and "ref=digits:train" in line
    saved = json.load(open(out))
    assert saved["num_samples"] == 120 and saved["extractor"].startswith("digits-cnn-")
    assert saved["reference"]["spec"] == "digits" and saved["reference"]["num_samples"] == 1438
    assert saved["fid"] > 0 and 1.0 < saved["is"] <= 10.0 and saved["is_splits"] == 10
    assert 0.0 < saved["precision"] <= 1.0 and 0.0 < saved["recall"] <= 1.0
    # the CLI and the library agree (one numerics path), and batch size does not matter
    ext = load_extractor("digits", weights)
    stats, _ = extract_stats(ext, [samples[1]], total=120, with_is=True)
    assert m["is"] == pytest.approx(stats["is"], rel=1e-9)
    m2 = evaluate.main(["--samples", samples[0], "--ref", "digits", "--extractor", "digits",
                        "--extractor-weights", weights, "--batch-size", "7", "--no-pr"])
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-6) and m2["precision"] is None


def test_evaluate_png_folder_and_npz_reference(tmp_path, weights, samples):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(samples[1][:30]):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    ref_path = str(tmp_path / "ref.npz")                             # ADM-style reference built from the samples
    ext = load_extractor("digits", weights)
    stats, _ = extract_stats(ext, [samples[1][:30]])
    np.savez(ref_path, mu=stats["mu"], sigma=stats["sigma"], arr_0=samples[1][:30])
    m = evaluate.main(["--samples", str(folder), "--ref", ref_path, "--extractor", "digits",
                       "--extractor-weights", weights, "--cache-dir", str(tmp_path / "cache")])
    # same images as the reference: 0 up to sqrtm error (30 samples < 64 dims: singular covariances)
    assert m["num_samples"] == 30 and abs(m["fid"]) < 1e-3
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_evaluate_cli_reports_missing_inception_weights_in_one_line(samples):
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--samples", samples[0], "--ref", "digits",
                           "--extractor", "inception"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "eval.inception_weights" in proc.stderr
    assert "Downloading" not in proc.stderr + proc.stdout


def test_evaluate_reports_feature_extraction_progress(weights, samples, monkeypatch, capsys):
    monkeypatch.setenv("ROAR_PROGRESS", "lines")  # the non-TTY mode of lightning_modules/progress.py
    monkeypatch.setenv("ROAR_PROGRESS_EVERY_S", "0")
    evaluate.main(["--samples", samples[0], "--ref", "digits", "--extractor", "digits", "--extractor-weights", weights,
                   "--batch-size", "60", "--no-pr"])
    err = capsys.readouterr().err
    assert "evaluate: sample features: 60/120 images (50.0%)" in err and "120/120 images (100.0%)" in err
