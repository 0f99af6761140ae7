"""Re-running pretokenize into the same --out: training reads exactly what the new manifest lists, rank 0 merges only
this run's parts, a run stopped midway leaves no manifest, and train/val with different class maps are refused."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from omegaconf import OmegaConf

from data_helpers import make_code_shards, make_shards
from lightning_modules.official.checkpoint_io import save_tokenizer
from tokenizers.pretokenize import cli, main
from tokenizers.vq import LlamaGenVQ

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 train shards x 3 images and 1 val shard of 16 px, their classes.json, and a digits VQ (16 px -> 4x4)."""
    root = tmp_path_factory.mktemp("rerun")
    train = make_shards(str(root / "img"), 4, 3, size=16)
    val = make_shards(str(root / "img"), 1, 4, prefix="val", size=16)
    json.dump({f"c{i}": i for i in range(10)}, open(root / "img" / "classes.json", "w"))
    torch.manual_seed(0)
    weights, _ = save_tokenizer(LlamaGenVQ.from_preset("digits").eval(), str(root / "tok"), kind="llamagen_vq")
    return root, train, val, weights


def run(data, out, *extra):
    _, train, _, weights = data
    return main(["--shards", train, "--out", str(out), "--tokenizer-kind", "llamagen_vq", "--tokenizer-path", weights,
                 "--image-size", "16", "--merge-timeout", "0", *extra])


def code_dir_module(code_dir, **kw):
    """The code DataModule over data.code_dir, as experiments.build makes it."""
    from datamodules.codes import CodeShardDataModule
    from experiments.data_defaults import code_shards

    cfg = OmegaConf.create({"data": {"code_dir": str(code_dir), "train_shards": "", "val_shards": ""}})
    train, val = code_shards(cfg)
    return CodeShardDataModule(train, val, batch_size=4, num_workers=0, **kw)


def keys_read(loader) -> list[str]:
    return [k for batch in loader for k in batch["_key"]]


def test_a_rerun_with_fewer_ranks_or_shards_reads_only_its_own_codes(data, tmp_path, capsys):
    from datamodules.codes import CodeShardDataModule

    out = tmp_path / "codes"
    run(data, out, "--rank", "1", "--world-size", "2")
    run(data, out, "--rank", "0", "--world-size", "2")  # codes-r0-*, codes-r1-*: 12 samples
    capsys.readouterr()
    manifest = run(data, out)  # the same images on 1 rank: codes-000000.tar
    assert manifest["shards"] == {"codes-000000.tar": 12}
    err = capsys.readouterr().err
    assert "2 stale code shard(s)" in err and "codes-r0-000000.tar" in err  # said, in one line
    dm = code_dir_module(out, resampled=False)
    assert dm.train_urls == [str(out / "codes-000000.tar")] and dm.samples_per_epoch == 12
    train_keys = keys_read(dm.train_dataloader())
    assert len(train_keys) == 12 and len(set(train_keys)) == 12  # each sample once, not the old ranks' copies too
    with pytest.raises(ValueError, match=r"data.train_shards: .*codes-r0-000000.tar is not in .*manifest.json"):
        CodeShardDataModule(str(out / "codes-*.tar"), None, batch_size=4, num_workers=0)  # a glob finds the old
    # more, smaller shards first, then the default: this rank's higher-numbered old shards go
    run(data, tmp_path / "small", "--maxcount", "5")
    assert sorted(os.listdir(tmp_path / "small")) == ["codes-000000.tar", "codes-000001.tar", "codes-000002.tar",
                                                      "manifest.json"]
    run(data, tmp_path / "small")
    assert sorted(os.listdir(tmp_path / "small")) == ["codes-000000.tar", "manifest.json"]


def test_rank0_merges_only_this_runs_parts(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "codes"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "first")
    run(data, out, "--rank", "1", "--world-size", "2")
    run(data, out, "--rank", "0", "--world-size", "2")
    assert json.load(open(out / "manifest.json"))["grid"] == [4, 4]
    # the next run, at 32 px (8x8 codes): rank 1's part of the first run is still there when rank 0 is done
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "second")
    capsys.readouterr()
    assert run(data, out, "--rank", "0", "--world-size", "2", "--image-size", "32") is None
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1/2 manifest parts of this run" in err and "manifest.r1.json stale (run_id 'first'" in err
    assert not os.path.exists(out / "manifest.json")  # not the first run's, nor a mix
    # in a real launch rank 0 waits: it merges once rank 1 of this run has replaced its old part
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "third")
    result = {}

    def rank0():
        try:
            result["m"] = run(data, out, "--rank", "0", "--world-size", "2", "--image-size", "32",
                              "--merge-timeout", "120")
        except Exception as exn:  # noqa: BLE001 - reported by the assertion below
            result["m"] = exn

    thread = threading.Thread(target=rank0)
    thread.start()
    run(data, out, "--rank", "1", "--world-size", "2", "--image-size", "32")
    thread.join(150)
    assert isinstance(result["m"], dict), result
    assert result["m"]["grid"] == [8, 8] and result["m"]["num_samples"] == 12
    assert json.load(open(out / "manifest.json"))["shards"] == {"codes-r0-000000.tar": 6, "codes-r1-000000.tar": 6}
    # by hand, --merge trusts the parts on disk (a rank may have been rerun in another launch)
    os.remove(out / "manifest.json")
    assert main(["--merge", "--out", str(out)])["grid"] == [8, 8]
    # ranks started by hand have no run id: a part of other settings or other input shards is still not this run's
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    run(data, out, "--rank", "1", "--world-size", "2", "--image-size", "32")
    for other, why in ((["--image-size", "16"], "grid [8, 8], this run's [4, 4]"),
                       (["--shards", data[1].replace("000003", "000001")], "inputs_digest")):
        capsys.readouterr()
        assert run(data, out, "--rank", "0", "--world-size", "2", *other) is None
        assert f"manifest.r1.json stale ({why}" in capsys.readouterr().err


def test_a_stopped_rerun_leaves_no_manifest_and_training_refuses_the_folder(data, tmp_path, monkeypatch):
    import tokenizers.pretokenize as pretokenize

    _, _, val, _ = data
    out = tmp_path / "codes"
    run(data, out, "--val-shards", val)
    code_dir_module(out)  # the completed run's folder is fine
    variants, calls = pretokenize.image_variants, []

    def stop_midway(*args, **kw):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt  # as Ctrl-C or a kill: nothing after it runs
        return variants(*args, **kw)

    monkeypatch.setattr(pretokenize, "image_variants", stop_midway)
    with pytest.raises(KeyboardInterrupt):
        run(data, out, "--val-shards", val, "--maxcount", "2")  # new codes-000000..2 written over the old ones
    assert not os.path.exists(out / "train" / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"code-shard manifest not found: .*train.manifest.json"):
        code_dir_module(out)


def test_train_and_val_with_different_class_maps_are_refused(data, tmp_path, capsys):
    root, train, _, weights = data
    other = make_shards(str(tmp_path / "other"), 1, 4, prefix="val", size=16)
    json.dump({f"d{i}": i for i in range(12)}, open(tmp_path / "other" / "classes.json", "w"))
    out = tmp_path / "codes"
    assert cli(["--shards", train, "--val-shards", other, "--out", str(out), "--tokenizer-kind", "llamagen_vq",
                "--tokenizer-path", weights, "--image-size", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "other" / "classes.json") in err
    assert str(root / "img" / "classes.json") in err and not os.path.exists(out)  # refused before any work
    # codes written apart (or by an older pretokenize): the DataModule compares the classes the manifests record
    from datamodules.codes import CodeShardDataModule

    tr = make_code_shards(str(tmp_path / "c" / "train"), 1, 4)
    va = make_code_shards(str(tmp_path / "c" / "val"), 1, 4)
    for split, classes in (("train", {"a": 0, "b": 1}), ("val", {"b": 0, "a": 1})):
        path = tmp_path / "c" / split / "manifest.json"
        json.dump(dict(json.load(open(path)), classes=classes), open(path, "w"))
    with pytest.raises(ValueError, match=r"val.manifest.json: its classes .* differ from those of the train codes"):
        CodeShardDataModule(tr, va, batch_size=2, num_workers=0)
    # the shard extractor: its val accuracy would score labels of another class map
    from experiments.train_extractor import cli as train_extractor

    assert train_extractor(["--shards", train, "--val-shards", other, "--image-size", "16", "--epochs", "1",
                            "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "other" / "classes.json") in err and "classes.json" in err
    assert not os.path.exists(tmp_path / "e.safetensors")
