"""README "Your own images", run as written: the test reads the section's code block from README.md (so the
commands cannot drift from what it runs) and runs each command in a folder holding a photo folder made of
scikit-image's bundled photos (tests/photo_helpers.py: 7 classes of 64 px crops). It walks ImageFolder -> image
shards -> extractor -> VQ -> pretokenize (train + val, 2 ranks under torchrun) -> train (2 CPU ranks: DDP, then
DeepSpeed ZeRO-2) -> sharded sampling (torchrun, 2 ranks) -> evaluate -> edit, every step through the CLI.

Then the acceptance checks of the feature: the VQ trained on the photos reconstructs their val images better than a
digits VQ trained with the same budget (PSNR, and rFID with the photo extractor), and the generator's samples score
a better FID with the photo extractor than uniform noise (same count).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow


def readme_commands(section: str = "## Your own images") -> list[str]:
    """The commands of the first ```bash block under ``section``: continuation lines joined, comments dropped."""
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(section)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(" ".join(current.split()))
            current = ""
    return commands


def env() -> dict:
    bin_dir = os.path.dirname(sys.executable)  # `python` and `torchrun` in the README resolve to this venv
    return subprocess_env(REPO, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")


def run(cmd: str, cwd, timings: dict | None = None) -> str:
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd}\nfailed ({proc.returncode}):\n{log[-5000:]}"
    if timings is not None:
        timings[cmd.split()[2] if cmd.startswith("python -m") else " ".join(cmd.split()[:5])] = round(time.time() - t0)
    return log


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_readme_section_parses():
    commands = readme_commands()
    assert len(commands) >= 12 and all(c.startswith(("python ", "torchrun ")) for c in commands), commands
    assert any("torchrun" in c and "pretokenize" in c for c in commands)
    assert any("deepspeed_zero2" in c for c in commands) and any("--image photos/" in c for c in commands)


def test_readme_own_images_walk(tmp_path):
    from photo_helpers import make_photo_folder

    make_photo_folder(str(tmp_path / "photos"))
    timings, logs = {}, {}
    for cmd in readme_commands():
        logs[cmd] = run(cmd, tmp_path, timings)
    print("step seconds:", json.dumps(timings))

    # shards and the extractor: 7 classes from the folder names
    assert len(load(tmp_path / "shards" / "classes.json")) == 7
    ext = load(tmp_path / "runs" / "extractors" / "photos.json")
    assert ext["domain"]["image_size"] == 64 and len(ext["domain"]["classes"]) == 7 and ext["val_accuracy"] > 0.8
    # the VQ, scored on the val shards with the photo extractor
    vq = load(tmp_path / "runs" / "photo_vq" / "metrics.json")
    assert vq["grid"] == [8, 8] and vq["rfid_images"] == 140 and vq["rfid_extractor"].startswith("shard-cnn-64px")
    # pretokenize on 2 ranks: train/ and val/ parts merged, the classes recorded
    codes = {split: load(tmp_path / "codes" / "photos" / split / "manifest.json") for split in ("train", "val")}
    assert codes["train"]["num_samples"] == 336 and codes["val"]["num_samples"] == 140
    assert codes["train"]["world_size"] == 2 and codes["train"]["num_classes"] == 7
    assert codes["val"]["num_variants"] == 1 and codes["train"]["num_variants"] == 2
    # both 2-rank runs: num_classes from the data, val/nll from codes/photos/val
    for name in ("photos_raster", "photos_randar"):
        m = load(tmp_path / "runs" / name / "metrics.json")
        assert m["val_nll_bits"] is not None and "val_nll_note" not in m, m
        assert "num_classes: 7" in open(tmp_path / "runs" / name / "config.yaml").read()
    train_logs = [log for cmd, log in logs.items() if "experiments.train " in cmd + " "]
    assert all("MEMBER: 2/2" in log for log in train_logs)  # both runs really had 2 ranks
    # sampling on 2 ranks, scored; the edit
    rec = [load(tmp_path / "samples" / "photos_raster" / f) for f in os.listdir(tmp_path / "samples" / "photos_raster")
           if f.endswith(".json") and f != "metrics.json"][0]
    assert rec["ranks"] == 2 and rec["num_samples"] == 140
    fid = load(tmp_path / "samples" / "photos_raster" / "metrics.json")
    assert fid["num_samples"] == 140 and fid["extractor"].startswith("shard-cnn-64px")
    assert os.path.isfile(tmp_path / "edits" / "photos" / "side_by_side.png")

    # acceptance 1: the photo VQ beats a digits VQ of the same budget on the photos' val images (PSNR and rFID)
    steps = re.search(r"train\.max_steps=(\d+)", " ".join(logs)).group(1)
    run(f"python -m experiments.train_tokenizer -c experiments/configs/tokenizer/digits_vq.yaml --out runs/digits_vq "
        f"--max-steps {steps} --batch-size 8", tmp_path, timings)
    scores = {}
    for name in ("photo_vq", "digits_vq"):
        run(f"python -m experiments.eval_tokenizer --tokenizer-kind llamagen_vq --tokenizer-path "
            f"runs/{name}/tokenizer.safetensors --shards 'shards/val-*.tar' --image-size 64 --extractor-weights "
            f"runs/extractors/photos.safetensors --out runs/{name}/photo_val.json", tmp_path)
        scores[name] = load(tmp_path / "runs" / name / "photo_val.json")
    assert abs(scores["photo_vq"]["val_psnr"] - vq["val_psnr"]) < 1e-6  # the same numbers as training reported
    assert scores["photo_vq"]["val_psnr"] > scores["digits_vq"]["val_psnr"]
    assert scores["photo_vq"]["val_rfid"] < scores["digits_vq"]["val_rfid"]

    # acceptance 2: samples score better than uniform noise with the photo extractor (same count)
    noise = np.random.default_rng(0).integers(0, 256, (fid["num_samples"], 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    run("python -m experiments.evaluate --samples noise.npz --ref 'shards/val-*.tar' --extractor shards "
        "--extractor-weights runs/extractors/photos.safetensors --out noise_metrics.json", tmp_path)
    noise_fid = load(tmp_path / "noise_metrics.json")["fid"]
    figures = {"photo_vq": scores["photo_vq"], "digits_vq": scores["digits_vq"], "samples_fid": fid["fid"],
               "noise_fid": noise_fid, "seconds": timings}
    print("figures:", json.dumps({k: v if not isinstance(v, dict) else {x: v[x] for x in ("val_psnr", "val_rfid")}
                                  if k != "seconds" else v for k, v in figures.items()}))
    assert fid["fid"] < noise_fid, (fid["fid"], noise_fid)


@pytest.mark.slurm
def test_pretokenize_sbatch_two_tasks(tmp_path):
    """experiments/slurm/pretokenize.sbatch on the local SLURM: 2 tasks encode their shares of train and val and
    rank 0 merges each split (a random-init small VQ: the sharding, not the codes, is under test)."""
    import torch

    from datamodules.shards import write_image_folder_shards
    from lightning_modules.official.checkpoint_io import save_tokenizer
    from photo_helpers import make_photo_folder
    from slurm_helpers import job_state, read, slurm_unavailable, wait_for
    from tokenizers.vq import LlamaGenVQ

    reason = slurm_unavailable()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    make_photo_folder(str(tmp_path / "photos"), train_per_class=4, val_per_class=2)
    for split in ("train", "val"):
        write_image_folder_shards(str(tmp_path / "photos" / split), str(tmp_path / "shards"), split, max_count=7)
    torch.manual_seed(0)
    save_tokenizer(LlamaGenVQ.from_preset("small").eval(), str(tmp_path / "vq"), kind="llamagen_vq")
    log = str(tmp_path / "job.out")
    proc = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
                           "experiments/slurm/pretokenize.sbatch", "--shards", str(tmp_path / "shards" / "train-*.tar"),
                           "--val-shards", str(tmp_path / "shards" / "val-*.tar"), "--out", str(tmp_path / "codes"),
                           "--tokenizer-kind", "llamagen_vq", "--tokenizer-path",
                           str(tmp_path / "vq" / "tokenizer.safetensors"), "--image-size", "64"],
                          cwd=REPO, env=subprocess_env(REPO, ROAR_PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: not job_state(job), 600, "the pretokenize job to finish", poll=1)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = read(log)
    for split, count in (("train", 28), ("val", 14)):
        manifest = load(tmp_path / "codes" / split / "manifest.json")
        assert manifest["world_size"] == 2 and manifest["num_samples"] == count, text[-3000:]
        assert {s.split("-")[1] for s in manifest["shards"]} == {"r0", "r1"}  # both ranks wrote codes


def test_vq16_256_preset_smoke(tmp_path):
    """The LlamaGen VQ-16 layout at 256 px (72M parameters) trains through the same CLI; a CPU can only smoke-test it:
    one step of batch 1 (a real run is a GPU job of ~400k steps: experiments/configs/tokenizer/vq16_256.yaml)."""
    from PIL import Image

    from datamodules.shards import write_image_folder_shards
    from photo_helpers import PHOTOS, photo_array

    for split in ("train", "val"):
        for name in PHOTOS[:2]:
            os.makedirs(tmp_path / "photos" / split / name)
            Image.fromarray(photo_array(name, 256)[:256, :256]).save(tmp_path / "photos" / split / name / "0.jpg")
        write_image_folder_shards(str(tmp_path / "photos" / split), str(tmp_path / "shards"), split)
    run("python -m experiments.train_tokenizer -c experiments/configs/tokenizer/vq16_256.yaml --out runs/vq16 "
        "--max-steps 1 --batch-size 1 --set data.train_shards='shards/train-*.tar' "
        "--set data.val_shards='shards/val-*.tar' --set data.num_workers=0 --set data.val_count=2 "
        "--set train.val_every_steps=0 --set train.extractor=none --set train.accelerator=cpu", tmp_path)
    m = load(tmp_path / "runs" / "vq16" / "metrics.json")
    assert m["grid"] == [16, 16] and m["vocab_size"] == 16384 and m["val_rfid"] is None and m["rfid_images"] == 2
