"""`experiments.sample` reruns into the same --out: a shard is reused only when exactly the same inputs made it
(weights, EMA or live, classes, every setting, seed), and bad set sizes or sampling values are one line, exit 2."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

FAST = ["sample.num_steps=4", "sample.cfg_scale=3", "sample.cfg_schedule=linear"]  # RandAR: 4 steps, a CFG ramp


def save_ckpt(path, seed: int, ema_seed: int | None = None) -> str:
    """A RandAR generator on the digits' pixel tokenizer as a Lightning-style checkpoint; ``ema_seed``: add EMA
    weights that differ from the live ones."""
    from lightning_modules.variants import build_module

    model = dict(variant="randar", flavour="llama", size="debug", num_classes=10, grid=[8, 8], class_dropout=0.0)
    torch.manual_seed(seed)
    m = build_module(model, {"build": {"kind": "pixel", "levels": 17}}, optim={}, max_steps=10)
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams),
            "roar": {"tokenizer_fingerprint": m.tokenizer_fingerprint, "vocab_size": 17}}
    if ema_seed is not None:
        g = torch.Generator().manual_seed(ema_seed)
        ckpt["callbacks"] = {"EMA": {"shadow": {k: v + 0.05 * torch.randn(v.shape, generator=g)
                                                for k, v in m.backbone.state_dict().items()}}}
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return save_ckpt(d / "a.ckpt", 0, ema_seed=1), save_ckpt(d / "b.ckpt", 2)


def sample(capfd, *args) -> str:
    from experiments.sample import main

    torch.set_num_threads(1)
    assert main(["--device", "cpu", *args]) == 0
    return capfd.readouterr().out


def npz_set(folder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for path in glob.glob(os.path.join(folder, "*.npz")):
        with np.load(path) as z:
            out[os.path.basename(path)] = (z["arr_0"], z["labels"])
    return out


@pytest.mark.parametrize("change", ["checkpoint", "no_ema", "classes", "cfg_start"])
def test_a_rerun_with_other_inputs_samples_anew_and_keeps_the_old_set(tmp_path, capfd, ckpts, change):
    a, b = ckpts
    base = ["--ckpt", a, "--classes", "0,1", "--per-class", "2", *FAST]
    other = {"checkpoint": ["--ckpt", b, *base[2:]], "no_ema": [*base, "--no-ema"],
             "classes": [*base[:2], "--classes", "2,3", *base[4:]], "cfg_start": [*base, "sample.cfg_start=2"]}[change]
    shared, fresh = str(tmp_path / "shared"), str(tmp_path / "fresh")
    sample(capfd, *base, "--out", shared)
    first = npz_set(shared)
    said = sample(capfd, *other, "--out", shared)
    assert "1 batches sampled, 0 already on disk" in said, said  # nothing of the first set was reused
    sample(capfd, *other, "--out", fresh)
    (alone,) = npz_set(fresh).items()
    both = npz_set(shared)
    assert len(both) == 2 and all(np.array_equal(both[k][0], v[0]) for k, v in first.items())  # the old set kept
    images, labels = both[alone[0]]  # the same name as a fresh run's, and its images
    assert np.array_equal(images, alone[1][0]) and np.array_equal(labels, alone[1][1])
    assert not np.array_equal(images, next(iter(first.values()))[0])
    record = json.loads(open(os.path.join(shared, alone[0].replace(".npz", ".json"))).read())
    assert record["checkpoint"] == os.path.abspath(other[1]) and record["classes"] == record["inputs"]["classes"]


def test_the_same_command_resumes_its_own_shards(tmp_path, capfd, ckpts):
    args = ["--ckpt", ckpts[0], "--num-samples", "6", "--batch-size", "2", "--out", str(tmp_path), *FAST]
    sample(capfd, *args)
    ((name, (images, _)),) = npz_set(tmp_path).items()
    shards = sorted(glob.glob(str(tmp_path / "*.shards" / "batch-*.npz")))
    os.remove(shards[1])
    os.remove(tmp_path / name)
    assert "1 batches sampled, 2 already on disk" in sample(capfd, *args)
    assert np.array_equal(npz_set(tmp_path)[name][0], images)


def test_a_folder_whose_shards_other_or_unknown_inputs_made_is_refused(tmp_path, capfd, ckpts):
    from experiments.sample import main

    args = ["--device", "cpu", "--ckpt", ckpts[1], "--per-class", "1", "--classes", "4", "--out", str(tmp_path),
            *FAST]
    sample(capfd, *args[2:])
    (folder,) = glob.glob(str(tmp_path / "*.shards"))
    inputs = os.path.join(folder, "inputs.json")
    record = json.loads(open(inputs).read())
    json.dump(dict(record, fingerprint="0" * 16), open(inputs, "w"))  # as if other inputs had made them
    for case in ("tampered", "missing"):
        if case == "missing":  # shards with no record of what made them (an older roar's folder)
            os.remove(inputs)
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capfd.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err and err.startswith(f"error: {folder}:"), err


@pytest.mark.parametrize("bad,culprit", [
    (["--per-class", "0"], "--per-class"), (["--batch-size", "0"], "--batch-size"),
    (["--num-samples", "-1"], "--num-samples"), (["--classes", "1,x"], "--classes"),
    (["sample.top_p=-0.5"], "sample.top_p"), (["sample.top_p=0"], "sample.top_p"),
    (["sample.temperature=0"], "sample.temperature"), (["sample.temperature=-1"], "sample.temperature"),
    (["sample.top_k=-5"], "sample.top_k")])
def test_bad_set_size_or_sampling_value_is_one_line_exit_2(tmp_path, capfd, ckpts, bad, culprit):
    from experiments.sample import main

    with pytest.raises(SystemExit) as exit_:
        main(["--ckpt", ckpts[0], "--out", str(tmp_path / "s"), *bad])
    err = capfd.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and err.startswith(f"error: {culprit}:"), err
    assert not os.path.exists(tmp_path / "s")  # nothing sampled, no file named after the bad value


@pytest.mark.parametrize("override", ["sample.top_p=-0.5", "sample.temperature=0", "sample.top_k=-5"])
def test_the_cli_and_the_training_config_refuse_a_value_with_the_same_words(capfd, override):
    from experiments.config import ConfigError, load_config
    from experiments.sample import parse_overrides

    with pytest.raises(ConfigError) as training:
        load_config([os.path.join("experiments", "configs", "demo", "raster.yaml")], [override])
    with pytest.raises(SystemExit):
        parse_overrides([override])
    assert capfd.readouterr().err.strip() == f"error: {training.value}"
