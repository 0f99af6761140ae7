"""CodeShardDataModule: variant picking, validation variant, bad samples, tokenizer fingerprint refusal."""
import os
from collections import Counter

import pytest

from data_helpers import make_code_shards
from datamodules.codes import CodeShardDataModule
from tokenizers.base import TokenizerMismatchError

FP = "abcd1234abcd1234"


@pytest.fixture(scope="module")
def code_pattern(tmp_path_factory):
    return make_code_shards(str(tmp_path_factory.mktemp("codes")), 2, 20, fingerprint=FP)


def picks(loader):
    """[(key, variant)] in order; variant v was stored as a grid filled with v."""
    out = []
    for batch in loader:
        assert batch["codes"].dtype.is_floating_point is False and str(batch["codes"].dtype) == "torch.int64"
        assert tuple(batch["codes"].shape[1:]) == (2, 3) and str(batch["label"].dtype) == "torch.int64"
        for key, codes in zip(batch["_key"], batch["codes"]):
            assert (codes == codes[0, 0]).all()
            out.append((key, int(codes[0, 0])))
    return out


def test_one_variant_per_sample_uniform_and_seeded(code_pattern):
    def run(seed):
        dm = CodeShardDataModule(code_pattern, batch_size=5, num_workers=2, seed=seed, resampled=False,
                                 expected_fingerprint=FP)
        loader = dm.train_dataloader()
        return [picks(loader) for _ in range(3)]  # 3 epochs

    a, b, c = run(0), run(0), run(1)
    assert a == b and a[0] != c[0]
    assert a[0] != a[1]  # new epoch, new picks (and order)
    for epoch in a:
        assert sorted(k for k, _ in epoch) == sorted(f"c{s}_{i:03d}" for s in range(2) for i in range(20))
    counts = Counter(v for epoch in a for _, v in epoch)  # 120 picks over 4 variants: 30 expected each
    assert set(counts) == {0, 1, 2, 3} and all(15 <= n <= 45 for n in counts.values())


def test_validation_uses_variant_zero(code_pattern):
    dm = CodeShardDataModule(code_pattern, val_shards=code_pattern, batch_size=8, num_workers=0)
    vals = picks(dm.val_dataloader())
    assert len(vals) == 40 and {v for _, v in vals} == {0}
    assert dm.grid == (2, 3) and dm.vocab_size == 16 and dm.tokenizer_info["fingerprint"] == FP
    assert dm.samples_per_epoch == 40  # from manifest.json


def test_fingerprint_mismatch_refused_naming_both(code_pattern):
    with pytest.raises(TokenizerMismatchError) as err:
        CodeShardDataModule(code_pattern, expected_fingerprint="ffff0000ffff0000")
    msg = str(err.value)
    assert FP in msg and "ffff0000ffff0000" in msg and "manifest.json" in msg


def test_bad_code_samples_skipped_and_counted(tmp_path):
    pattern = make_code_shards(str(tmp_path), 1, 10, bad={(0, 2): "grid", (0, 6): "range"})
    dm = CodeShardDataModule(pattern, batch_size=4, num_workers=0, resampled=False)
    keys = [k for k, _ in picks(dm.train_dataloader())]
    assert len(keys) == 8 and "c0_002" not in keys and "c0_006" not in keys
    assert dm.skipped_total() == 2


def test_missing_manifest_and_resampled_epoch(tmp_path, code_pattern):
    pattern = make_code_shards(str(tmp_path), 1, 4)
    os.remove(os.path.join(str(tmp_path), "manifest.json"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CodeShardDataModule(pattern, samples_per_epoch=4)
    dm = CodeShardDataModule(code_pattern, batch_size=4, num_workers=2, samples_per_epoch=24)
    loader = dm.train_dataloader()  # 24 // 2 workers = 12 per worker = 3 batches each
    assert len(loader) == 6 and sum(len(b["_key"]) for b in loader) == 24


def test_reads_what_pretokenize_writes(tmp_path):
    """Integration with tokenizers/pretokenize.py: embedded digits -> pixel codes -> this DataModule."""
    import json
    import subprocess
    import sys

    pytest.importorskip("tokenizers.pretokenize")
    from datamodules.digits import digits_arrays
    from datamodules.embedded import embedded_shards, ensure_embedded

    ensure_embedded(str(tmp_path / "digits"), verbose=False)
    out = tmp_path / "codes"
    shards = embedded_shards(str(tmp_path / "digits"), "val")
    cmd = [sys.executable, "-m", "tokenizers.pretokenize", "--shards", shards, "--out", str(out),
           "--tokenizer-kind", "pixel", "--image-size", "8", "--maxcount", "200"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    pattern = str(out / "codes-{000000..000001}.tar")
    dm = CodeShardDataModule(pattern, val_shards=pattern, batch_size=50, num_workers=0,
                             expected_fingerprint=manifest["tokenizer"]["fingerprint"])
    labels = digits_arrays("val")[1]
    got = {k: int(lab) for b in dm.val_dataloader() for k, lab in zip(b["_key"], b["label"])}
    assert len(got) == len(labels) and all(labels[int(k.split("_")[1])] == v for k, v in got.items())
    assert dm.grid == (8, 8) and dm.skipped_total() == 0
    # a run over these codes at another data.image_size is refused in one line (its samples decode at 8 px)
    train = subprocess.run([sys.executable, "-m", "experiments.train", "-c", "experiments/configs/demo/raster.yaml",
                            "data.kind=codes", f"data.code_dir={out}", "data.image_size=16", "trainer.max_steps=1",
                            f"out_dir={tmp_path / 'runs'}"], cwd=root, capture_output=True, text=True)
    assert train.returncode == 2 and train.stderr.strip().splitlines() == [
        f"error: config data.image_size: 16 contradicts the codes, made at 8 px ({out / 'manifest.json'}): set "
        f"data.image_size=8"]
