"""Unsafe checkpoints: a kill inside a checkpoint write leaves the previous one intact (and its temp file is never
taken for a checkpoint), every load is weights_only=True (a pickled object is refused in one line), and a
checkpoint made with another tokenizer or vocabulary is refused in one line naming both, before any weight loads."""
from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from experiments.config import load_config

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Runs experiments.train.main with torch.save patched: the first save of last.ckpt is also copied aside (to compare
# with later), the second writes half of its bytes into the temp file and the process dies on the spot.
CRASH_IN_SAVE = r"""
import io, os, sys
import torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    name = str(getattr(f, "name", f))
    if ".ckpt.tmp-" in name and os.path.basename(name).startswith("last.ckpt"):
        calls.append(name)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        if len(calls) == 2:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os._exit(9)
        with open(os.path.join(os.path.dirname(name), "first-last.bytes"), "wb") as copy:
            copy.write(buf.getvalue())
        f.write(buf.getvalue())
        return None
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from experiments.train import main
main(sys.argv[1:])
"""


def overrides(tmp_path, name: str, *extra) -> list[str]:
    return ["model.size=debug", f"out_dir={tmp_path}", f"data.root={tmp_path}/digits", f"name={name}",
            "trainer.accelerator=cpu", "trainer.global_batch_size=8", "trainer.val_every_steps=100",
            "trainer.limit_val_batches=1", "callbacks.sample_every_steps=0", *extra]


@pytest.mark.slow
def test_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from experiments.train import run
    from lightning_modules.checkpointing import find_resume_checkpoint

    args = overrides(tmp_path, "crash", "trainer.max_steps=6", "trainer.ckpt_every_steps=2")
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE, "-c", DEMO, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 9, proc.stderr[-3000:]  # died inside the second save of last.ckpt (step 4)
    run_dir = os.path.join(str(tmp_path), "crash")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    temps = glob.glob(last + ".tmp-*")
    assert len(temps) == 1 and os.path.getsize(temps[0]) > 0  # the half-written file is there ...
    with pytest.raises(Exception):
        torch.load(temps[0], weights_only=True)  # ... and unreadable
    with open(last, "rb") as a, open(os.path.join(run_dir, "checkpoints", "first-last.bytes"), "rb") as b:
        assert a.read() == b.read()  # the previous checkpoint is intact, byte for byte ...
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2  # ... and loads
    assert find_resume_checkpoint("auto", run_dir) == last  # the temp file is never a resume candidate

    # the same command again resumes from step 2, reading only with weights_only=True
    real_load, seen = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))
    result = run(load_config([DEMO], args), quiet=True)
    assert result["resumed_from"] == last and result["steps"] == 6
    assert seen and all(w is True for w in seen), seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step run's last.ckpt (pixel tokenizer, 17 levels)."""
    from experiments.train import run

    out = tmp_path_factory.mktemp("ckpt")
    run(load_config([DEMO], overrides(out, "base", "trainer.max_steps=2", "trainer.ckpt_every_steps=2")), quiet=True)
    return out, os.path.join(str(out), "base", "checkpoints", "last.ckpt")


def fingerprint(levels: int) -> str:
    from tokenizers.registry import build_tokenizer

    return build_tokenizer(kind="pixel", levels=levels).fingerprint


def test_resume_with_another_tokenizer_is_refused_naming_both(trained):
    from experiments.train import run
    from tokenizers.base import TokenizerMismatchError

    out, ckpt = trained
    cfg = load_config([DEMO], overrides(out, "other", "tokenizer.levels=9", f"resume={ckpt}", "trainer.max_steps=4"))
    with pytest.raises(TokenizerMismatchError) as err:
        run(cfg, quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and fingerprint(17) in msg and fingerprint(9) in msg, msg
    assert "vocabulary 17" in msg and "vocabulary 9" in msg


def test_resume_with_another_tokenizer_through_the_cli_exits_2_in_one_line(trained):
    out, ckpt = trained
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "-c", DEMO,
                           *overrides(out, "other_cli", "tokenizer.levels=9", f"resume={ckpt}", "trainer.max_steps=4")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fingerprint(17) in errors[0] and fingerprint(9) in errors[0], proc.stderr[-3000:]


def test_same_vocabulary_other_tokenizer_is_refused(module_factory):
    from tokenizers.base import TokenizerMismatchError

    module = module_factory("raster")  # codes tokenizer, vocabulary 11
    with pytest.raises(TokenizerMismatchError, match=f"deadbeefdeadbeef .*{module.tokenizer_fingerprint}"):
        module.on_load_checkpoint({"roar": {"tokenizer_fingerprint": "deadbeefdeadbeef", "vocab_size": 11}})
    module.on_load_checkpoint({"roar": {"tokenizer_fingerprint": module.tokenizer_fingerprint, "vocab_size": 11}})


class Payload:
    """Unpickling this would run code; weights_only=True must refuse it instead."""

    def __reduce__(self):
        return (print, ("payload ran",))


def test_a_pickled_object_in_a_checkpoint_is_refused_in_one_line(trained, tmp_path, capsys):
    from experiments.train import main

    out, ckpt = trained
    evil = str(tmp_path / "evil.ckpt")
    torch.save({**torch.load(ckpt, weights_only=True), "extra": Payload()}, evil)
    with pytest.raises(SystemExit) as exit_:
        main(["-c", DEMO, *overrides(out, "evil", f"resume={evil}", "trainer.max_steps=4")])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "payload ran" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and evil in errors[0] and "weights_only=True" in errors[0], captured.err[-2000:]


def test_every_torch_load_in_the_code_is_weights_only():
    """Static guard over the non-test code: torch.load / load_from_checkpoint always pass weights_only=True."""
    offenders = []
    for package in ("datamodules", "experiments", "lightning_modules", "tokenizers"):
        for path in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True):
            tree = ast.parse(open(path).read(), path)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                is_torch_load = node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"
                if is_torch_load or node.func.attr == "load_from_checkpoint":
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    assert not offenders, offenders
