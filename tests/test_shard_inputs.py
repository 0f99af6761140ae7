"""The image shard writer on inputs users have: 16-bit grey photos, class folders with dots, tars cut at a block
edge, and a writer killed while its worker processes run (datamodules/shards.py, datamodules/transforms.py)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
from PIL import Image

from datamodules.shards import iter_tar_samples, write_image_folder_shards, write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stored_pixels(out: str, split: str = "train") -> dict[str, np.ndarray]:
    """{sample key: decoded uint8 array} of every shard the writer produced."""
    pixels = {}
    for name in sorted(json.load(open(os.path.join(out, f"{split}-manifest.json")))["shards"]):
        with tarfile.open(os.path.join(out, name)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    pixels[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
    return pixels


def test_16_bit_grey_is_rescaled_not_clipped_and_a_float_image_is_skipped_with_its_reason(tmp_path):
    src = tmp_path / "src" / "grey"
    os.makedirs(src)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # mean 32767.5 of 65535
    Image.fromarray(ramp).save(src / "ramp16.png")
    Image.fromarray(ramp).save(src / "tiff16.tif")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(src / "ramp8.png")
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(src / "float.tif")
    m = write_image_folder_shards(str(tmp_path / "src"), str(tmp_path / "out"))
    pixels = _stored_pixels(str(tmp_path / "out"))
    assert set(pixels) == {"grey_ramp16", "grey_tiff16", "grey_ramp8"}
    for key, arr in pixels.items():  # PIL's convert("L") clipped the 16-bit ramp: mean ~254 of 255
        assert abs(float(arr.mean()) - 127.5) < 2.0, (key, arr.mean())
    assert m["num_samples"] == 3 and len(m["skipped_files"]) == 1 and "float.tif" in m["skipped_files"][0]
    assert "mode F" in m["skipped_files"][0]


def test_a_class_folder_with_a_dot_is_written_and_read_back_with_its_label(tmp_path):
    from datamodules.images import ImageShardDataModule

    for c, cls in enumerate(["st.bernard", "tabby"]):
        os.makedirs(tmp_path / "src" / cls)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * c + i, np.uint8)).save(tmp_path / "src" / cls / f"{i}.v1.jpg")
    m = write_image_folder_shards(str(tmp_path / "src"), str(tmp_path / "out"))
    assert m["num_samples"] == 4 and json.load(open(tmp_path / "out" / "classes.json")) == {"st.bernard": 0,
                                                                                           "tabby": 1}
    dm = ImageShardDataModule(str(tmp_path / "out" / "train-000000.tar"), val_shards=str(tmp_path / "out" /
                              "train-000000.tar"), batch_size=4, num_workers=0, image_size=8)
    labels = {k: lab for b in dm.val_dataloader() for k, lab in zip(b["_key"], b["label"].tolist())}
    assert labels == {"st_bernard_0_v1": 0, "st_bernard_1_v1": 0, "tabby_0_v1": 1, "tabby_1_v1": 1}


def test_a_tar_cut_at_a_block_edge_is_one_skip_event_and_a_whole_one_none(tmp_path):
    path = str(tmp_path / "s.tar")
    write_tar(path, [{"__key__": f"k{i}", "bin": os.urandom(700)} for i in range(5)])
    whole = open(path, "rb").read()
    with tarfile.open(path) as tar:
        cut = tar.getmember("k3.bin").offset  # a header boundary: python's tarfile just stops there
    errors = []
    assert len(list(iter_tar_samples(path, errors.append))) == 5 and errors == []
    for size in (cut, cut + 512 + 1024, len(whole) - len(whole) % 10240 if len(whole) > 10240 else cut):
        with open(path, "wb") as f:
            f.write(whole[:size])
        errors = []
        read = list(iter_tar_samples(path, errors.append))
        assert len(errors) == 1 and "truncated tar" in errors[0], (size, errors)
        assert len(read) < 5 and [s["__key__"] for s in read] == [f"k{i}" for i in range(len(read))]


def test_a_killed_writer_takes_its_worker_processes_with_it(tmp_path):
    """SIGTERM to the writer while its workers run: it exits 143 within a bound and no worker outlives it (they
    used to keep writing, and raced the re-run's renames)."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        from datamodules.shards import _in_processes

        def work(folder, k):
            open(os.path.join(folder, f"w{{k}}.pid"), "w").write(str(os.getpid()))
            time.sleep(120)

        _in_processes(work, [({str(tmp_path)!r}, k) for k in range(2)])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    pids_files = [tmp_path / f"w{k}.pid" for k in range(2)]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text() for p in pids_files):
        assert time.monotonic() < deadline and proc.poll() is None, "the workers never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    for p in pids_files:
        pid = int(p.read_text())
        for _ in range(100):  # terminated workers are reaped by the pool before the writer exits
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"worker {pid} outlived the killed writer")


def test_a_subfolder_inside_a_class_folder_is_named_not_dropped_silently(tmp_path, capsys):
    for sub in ("", "more"):
        os.makedirs(tmp_path / "src" / "tabby" / sub, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "tabby" / sub / "0.png")
    m = write_image_folder_shards(str(tmp_path / "src"), str(tmp_path / "out"))
    assert m["num_samples"] == 1
    assert "warning: 1 subfolder(s) inside class folders are not read, e.g. tabby/more" in capsys.readouterr().err
