"""Reference statistics: ADM .npz validation, streamed arr_0, WebDataset shards + cache, digits."""
import io
import os

import numpy as np
import pytest
import torch

from datamodules.digits import digits_arrays
from lightning_modules.metrics import reference as reference_mod
from lightning_modules.metrics.extractors import load_extractor, save_digits_extractor, train_digits_extractor
from lightning_modules.metrics.reference import (NpzImages, RefStats, extract_stats, load_reference_npz,
                                                 resolve_reference, save_reference_npz, shard_reference)


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    model, info = train_digits_extractor(seed=0, epochs=3)           # quality is irrelevant here
    path = str(tmp_path_factory.mktemp("ext") / "digits.safetensors")
    save_digits_extractor(model, path, info)
    return load_extractor("digits", path)


@pytest.fixture(scope="module")
def images():
    x, _ = digits_arrays("val")
    return np.repeat(x[:100, :, :, None], 3, axis=-1)               # uint8 [100, 8, 8, 3] NHWC


def test_adm_reference_is_read_and_arr0_gives_pr_features(tmp_path, ext, images):
    stats, _ = extract_stats(ext, [images])
    path = str(tmp_path / "VIRTUAL_digits_labeled.npz")
    np.savez(path, mu=stats["mu"], sigma=stats["sigma"], arr_0=images[:40], mu_s=np.zeros(3))  # ADM layout
    ref = load_reference_npz(path, ext, need_features=True, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_allclose(ref.mu, stats["mu"])
    assert ref.sigma.shape == (64, 64) and ref.extractor == "" and ref.source == path
    assert ref.features.shape == (40, 64)
    np.testing.assert_allclose(ref.features, ext.features(torch.from_numpy(images[:40]).permute(0, 3, 1, 2)).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert any(f.startswith("ref-arr0-") for f in os.listdir(tmp_path / "cache"))  # arr_0 features cached
    assert resolve_reference(path, ext, need_features=False).features is None


@pytest.mark.parametrize("drop,key", [("sigma", "sigma"), ("mu", "mu")])
def test_malformed_reference_names_file_and_missing_key(tmp_path, drop, key):
    arrays = {"mu": np.zeros(64), "sigma": np.eye(64)}
    del arrays[drop]
    path = str(tmp_path / "bad_ref.npz")
    np.savez(path, **arrays)
    with pytest.raises(KeyError) as e:
        load_reference_npz(path)
    assert path in str(e.value) and f"missing key '{key}'" in str(e.value)


def test_reference_shape_and_extractor_checks(tmp_path, ext):
    path = str(tmp_path / "shape.npz")
    np.savez(path, mu=np.zeros(64), sigma=np.eye(63))
    with pytest.raises(ValueError, match=r"shape\.npz: key 'sigma' must be \[64, 64\]"):
        load_reference_npz(path)
    adm = str(tmp_path / "adm2048.npz")
    np.savez(adm, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d statistics but extractor digits-cnn-.* gives 64-d"):
        load_reference_npz(adm, ext)
    other = str(tmp_path / "other.npz")
    save_reference_npz(other, RefStats(np.zeros(64), np.eye(64), 10, "digits-cnn-000000000000", "x"))
    with pytest.raises(ValueError, match="computed with extractor 'digits-cnn-000000000000'"):
        load_reference_npz(other, ext)


def test_npz_images_streams_arr0_and_validates(tmp_path, images):
    path = str(tmp_path / "samples.npz")
    np.savez_compressed(path, arr_0=images)
    arr = NpzImages(path)
    assert len(arr) == 100 and arr.shape == (100, 8, 8, 3)
    np.testing.assert_array_equal(np.concatenate(list(arr.batches(33))), images)
    np.testing.assert_array_equal(np.concatenate(list(arr.batches(33, limit=50))), images[:50])
    np.savez(str(tmp_path / "float.npz"), arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="float.npz: key 'arr_0' must be uint8"):
        NpzImages(str(tmp_path / "float.npz"))
    np.savez(str(tmp_path / "nokey.npz"), images=images)
    with pytest.raises(KeyError, match="nokey.npz: missing key 'arr_0'"):
        NpzImages(str(tmp_path / "nokey.npz"))


def _write_shards(folder, images, per_shard=50):
    import webdataset as wds
    from PIL import Image

    with wds.ShardWriter(os.path.join(folder, "digits-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(i % 10).encode()})


def test_shard_reference_is_computed_once_and_cached(tmp_path, ext, images, monkeypatch):
    _write_shards(str(tmp_path), images)
    pattern = str(tmp_path / "digits-{000000..000001}.tar")
    cache = str(tmp_path / "cache")
    ref = resolve_reference(pattern, ext, image_size=8, count=80, cache_dir=cache)
    want, _ = extract_stats(ext, [images[:80]])                      # PNG is lossless; 8 px crop is identity
    assert ref.num_samples == 80 and ref.extractor == ext.name and ref.features.shape == (80, 64)
    np.testing.assert_allclose(ref.mu, want["mu"], rtol=1e-6)
    np.testing.assert_allclose(ref.sigma, want["sigma"], rtol=1e-5, atol=1e-8)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("ref-digits-8px-n80-" + ext.name)
    # second call: served from the cache, no feature extraction at all
    monkeypatch.setattr(reference_mod, "extract_stats", lambda *a, **k: pytest.fail("cache miss"))
    again = shard_reference(pattern, ext, image_size=8, count=80, cache_dir=cache)
    np.testing.assert_array_equal(again.mu, ref.mu)
    monkeypatch.undo()
    shard_reference(str(tmp_path / "digits-*.tar"), ext, image_size=8, count=0, cache_dir=cache)  # other key
    assert len(os.listdir(cache)) == 2
    with pytest.raises(FileNotFoundError, match="eval.reference: shard not found: .*missing-0.tar"):
        resolve_reference(str(tmp_path / "missing-{0..1}.tar"), ext, cache_dir=cache)


def test_shard_reference_skips_and_counts_a_corrupt_sample_and_takes_brace_alternatives(tmp_path, ext, images,
                                                                                       capsys):
    """A truncated image in the reference shards is skipped and counted (it used to end experiments.evaluate and
    the FID callback with a traceback); '{a,b}' lists shards as the DataModules read them."""
    import webdataset as wds
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    with wds.TarWriter(str(tmp_path / "ref-000000.tar")) as sink:
        for i, img in enumerate(images[:6]):
            data = buf.getvalue()[:40] if i == 2 else _png(img)
            sink.write({"__key__": f"{i:06d}", "png": data, "cls": b"0"})
    _write_shards(str(tmp_path), images[6:36], per_shard=10)
    pattern = str(tmp_path / "ref-000000.tar") + "," + str(tmp_path / "digits-{000000,000002}.tar")
    ref = resolve_reference(pattern, ext, image_size=8, count=0, cache_dir=None)
    want, _ = extract_stats(ext, [np.concatenate([images[[0, 1, 3, 4, 5]], images[6:16], images[26:36]])])
    assert ref.num_samples == 25 and "reference: skipped 1 corrupt sample(s)" in capsys.readouterr().err
    np.testing.assert_allclose(ref.mu, want["mu"], rtol=1e-6)


def _png(img) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_digits_reference_splits(ext):
    train, val = resolve_reference("digits", ext), resolve_reference("digits:val", ext)
    assert train.num_samples == 1438 and val.num_samples == 359 and train.source == "digits:train"
    with pytest.raises(ValueError, match="unknown split"):
        resolve_reference("digits:test", ext)


def test_reference_statistics_report_progress(tmp_path, ext, images, monkeypatch, capsys):
    monkeypatch.setenv("ROAR_PROGRESS", "lines")  # the non-TTY mode of lightning_modules/progress.py
    monkeypatch.setenv("ROAR_PROGRESS_EVERY_S", "0")
    _write_shards(str(tmp_path), images)
    pattern = str(tmp_path / "digits-{000000..000001}.tar")
    shard_reference(pattern, ext, image_size=8, count=80, cache_dir=None, batch_size=40)
    err = capsys.readouterr().err
    assert f"reference stats ({pattern}): 40/80 images" in err and "80/80 images (100.0%)" in err
    shard_reference(pattern, ext, image_size=8, count=80, cache_dir=None, show_progress=False)
    assert "reference stats" not in capsys.readouterr().err
