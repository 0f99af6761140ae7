"""Bad input to any CLI is one line naming the file, exit code 2, no traceback: a bad init_from, a missing or foreign
checkpoint, a missing weight file."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env

ENV = subprocess_env(REPO, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
DEBUG = "experiments/configs/debug_raster.yaml"
TRAIN = ["experiments.train", "-c", DEBUG, "trainer.max_steps=1", "callbacks.sample_every_steps=0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.ckpt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {"backbone.w": torch.zeros(2)}, "hyper_parameters": {}}, d / "foreign.ckpt")
    torch.save({"weights": torch.zeros(3)}, d / "plain.pt")
    (d / "run").mkdir()
    return d


CASES = {  # name -> (argv with {d} for the folder of bad files, the file the message must name)
    "init_from missing": ([*TRAIN, "init_from={d}/missing.ckpt", "out_dir={d}/o1"], "{d}/missing.ckpt"),
    "init_from not a checkpoint": ([*TRAIN, "init_from={d}/notes.ckpt", "out_dir={d}/o2"], "{d}/notes.ckpt"),
    "init_from another model": ([*TRAIN, "init_from={d}/foreign.ckpt", "out_dir={d}/o3"], "{d}/foreign.ckpt"),
    "resume missing": ([*TRAIN, "resume={d}/missing.ckpt", "out_dir={d}/o4"], "{d}/missing.ckpt"),
    "resume not a checkpoint": ([*TRAIN, "resume={d}/notes.ckpt", "out_dir={d}/o5"], "{d}/notes.ckpt"),
    "tokenizer weights missing": ([*TRAIN, "tokenizer.kind=digits_vq", "tokenizer.path={d}/vq.safetensors",
                                   "data.image_size=32", "out_dir={d}/o6"], "{d}/vq.safetensors"),
    "FID extractor missing": ([*TRAIN, "eval.fid_num_samples=10", "eval.extractor_weights={d}/ext.safetensors",
                               "out_dir={d}/o7"], "{d}/ext.safetensors"),
    "sample: missing checkpoint": (["experiments.sample", "--ckpt", "{d}/missing.ckpt", "--out", "{d}/s"],
                                   "{d}/missing.ckpt"),
    "sample: foreign checkpoint": (["experiments.sample", "--ckpt", "{d}/foreign.ckpt", "--out", "{d}/s"],
                                   "{d}/foreign.ckpt"),
    "sample: empty run folder": (["experiments.sample", "--ckpt", "{d}/run", "--out", "{d}/s"], "{d}/run"),
    "export: not a checkpoint": (["experiments.export", "--ckpt", "{d}/notes.ckpt", "--out", "{d}/e"],
                                 "{d}/notes.ckpt"),
    "edit: missing checkpoint": (["experiments.edit", "--ckpt", "{d}/missing.ckpt", "--task", "inpaint",
                                  "--from-dataset", "0", "--out", "{d}/x"], "{d}/missing.ckpt"),
    "evaluate: missing samples": (["experiments.evaluate", "--samples", "{d}/none.npz", "--ref", "digits",
                                   "--extractor", "digits"], "{d}/none.npz"),
    "evaluate: missing Inception weights": (["experiments.evaluate", "--samples", "{d}/plain.pt", "--ref", "digits",
                                             "--extractor", "inception", "--extractor-weights", "{d}/inc.pth"],
                                            "{d}/inc.pth"),
    "cross_order: missing run": (["experiments.cross_order", "--runs", "{d}/nowhere", "--out", "{d}/c"],
                                 "{d}/nowhere"),
    "import_official: missing file": (["experiments.import_official", "--family", "randar", "--ckpt",
                                       "{d}/RandAR-L.safetensors", "--out", "{d}/i"], "{d}/RandAR-L.safetensors"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, files):
    argv, named = CASES[case]
    argv = [a.format(d=files) for a in argv]
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    err = [line for line in proc.stderr.splitlines() if "error" in line.lower() and "warn" not in line.lower()]
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stderr[-2500:]}"
    assert "Traceback" not in proc.stderr, f"{case}:\n{proc.stderr[-2500:]}"
    assert len(err) == 1 and named.format(d=files) in err[0], f"{case}: {err}"
