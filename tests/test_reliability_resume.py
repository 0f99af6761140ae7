"""Kill -9 in the middle of training, rerun the same command (resume=auto): the final weights, optimizer state and
EMA shadow equal those of a run that was never interrupted, tensor for tensor (CPU, trainer.deterministic, dropout
on, killed mid-epoch, with 0 and with 1 DataLoader worker). Plus the two pieces that make it hold, tested alone:
the shard loader resumes mid-epoch exactly, and dropout inside a training step is a function of the step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")
MAX_STEPS, CKPT_EVERY, KILL_AT = 24, 3, 6
BATCH, EPOCH_SAMPLES = 8, 64  # 8 batches an epoch: every checkpoint but the last (24) is mid-epoch
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(out: str, name: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "-c", DEMO, "model.size=debug", f"out_dir={out}",
            f"data.root={out}/digits", f"name={name}", "trainer.accelerator=cpu", "trainer.deterministic=true",
            f"trainer.global_batch_size={BATCH}", f"data.samples_per_epoch={EPOCH_SAMPLES}",
            f"data.num_workers={workers}", f"trainer.max_steps={MAX_STEPS}", f"trainer.ckpt_every_steps={CKPT_EVERY}",
            "trainer.val_every_steps=12", "trainer.limit_val_batches=2", "trainer.log_every_steps=4",
            "callbacks.sample_every_steps=0", "callbacks.ema_decay=0.9", "optim.warmup_steps=4",
            # dropout on: its masks come from the global RNG, which Lightning does not checkpoint
            "model.llama.token_dropout=0.1", "model.llama.resid_dropout=0.1", "model.llama.ffn_dropout=0.1"]


def start(out: str, name: str, workers: int) -> subprocess.Popen:
    with open(os.path.join(out, f"{name}.log"), "ab") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(train_command(out, name, workers), cwd=REPO, env=ENV, stdout=log, stderr=log)


def finish(proc: subprocess.Popen, out: str, name: str, timeout: float = 400) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"{name} exited {rc}:\n" + tail(out, name)


def tail(out: str, name: str) -> str:
    with open(os.path.join(out, f"{name}.log")) as f:
        return f.read()[-3000:]


def saved_steps(out: str, name: str) -> list[int]:
    folder = os.path.join(out, name, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [int(n[4:-5]) for n in names if n.startswith("step") and n.endswith(".ckpt")]


def kill_after_checkpoint(procs: dict, out: str, step: int, timeout: float = 400) -> None:
    """Poll every run for a checkpoint at ``step`` or later, then SIGKILL it: no handler, no teardown, no final
    save. (save_top_k=1 deletes older step files, so any step >= ``step`` counts.)"""
    deadline, waiting = time.time() + timeout, dict(procs)
    while waiting:
        for name, proc in list(waiting.items()):
            if any(s >= step for s in saved_steps(out, name)):
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL, f"{name} finished before it could be killed"
                del waiting[name]
            else:
                assert proc.poll() is None, f"{name} ended early:\n" + tail(out, name)
        assert time.time() < deadline, f"no checkpoint for step {step} after {timeout} s in {sorted(waiting)}"
        time.sleep(0.005)


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str) -> None:
    """Recursive, exact: tensors equal elementwise (NaN never expected), everything else equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def ema_state(ckpt: dict) -> dict:
    keys = [k for k in ckpt["callbacks"] if k.startswith("EMA")]
    assert len(keys) == 1, sorted(ckpt["callbacks"])
    return ckpt["callbacks"][keys[0]]


@pytest.fixture
def procs():
    """Every training process a test starts; whatever still runs when the test ends (a failure) is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


@pytest.mark.slow
def test_kill9_then_resume_auto_matches_an_uninterrupted_run(tmp_path, procs):
    from datamodules.embedded import ensure_embedded

    out, per_epoch = str(tmp_path), EPOCH_SAMPLES // BATCH
    ensure_embedded(os.path.join(out, "digits"), verbose=False)  # once, before three processes want it
    # the reference and the two runs to kill go side by side: the machine is mostly waiting on imports
    reference = start(out, "reference", 0)
    killed = {w: start(out, f"killed{w}", w) for w in (0, 1)}
    procs += [reference, *killed.values()]
    kill_after_checkpoint({f"killed{w}": proc for w, proc in killed.items()}, out, KILL_AT)
    interrupted_at = {}
    for w in killed:
        last = load(os.path.join(out, f"killed{w}", "checkpoints", "last.ckpt"))
        interrupted_at[w] = last["global_step"]
        assert KILL_AT - CKPT_EVERY <= interrupted_at[w] < MAX_STEPS, interrupted_at[w]
        assert interrupted_at[w] % per_epoch, "the kill must land mid-epoch"
        loader = last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]  # our loader's position is saved
        assert (loader["epoch"], loader["batches"]) == divmod(interrupted_at[w], per_epoch)
    resumed = {w: start(out, f"killed{w}", w) for w in killed}  # the same command again: resume=auto
    procs += resumed.values()
    finish(reference, out, "reference")
    for w, proc in resumed.items():
        finish(proc, out, f"killed{w}")

    ref = load(os.path.join(out, "reference", "checkpoints", "last.ckpt"))
    assert ref["global_step"] == MAX_STEPS
    for w in killed:
        with open(os.path.join(out, f"killed{w}", "metrics.json")) as f:
            metrics = json.load(f)
        assert metrics["resumed_from"].endswith("last.ckpt") and metrics["steps"] == MAX_STEPS
        got = load(os.path.join(out, f"killed{w}", "checkpoints", "last.ckpt"))
        where = f"{w} worker(s), killed after step {interrupted_at[w]}"
        assert got["global_step"] == MAX_STEPS
        assert_same_tensors(ref["state_dict"], got["state_dict"], f"weights ({where})")
        assert_same_tensors(ref["optimizer_states"], got["optimizer_states"], f"optimizer ({where})")
        assert_same_tensors(ema_state(ref), ema_state(got), f"EMA ({where})")


# ----------------------------------------------------------------------------- the pieces, in process
def _loader(root: str, workers: int):
    from datamodules.images import ImageShardDataModule
    from datamodules.embedded import embedded_shards, ensure_embedded

    manifest = ensure_embedded(root, verbose=False)
    dm = ImageShardDataModule(embedded_shards(root, "train", manifest), batch_size=4, num_workers=workers,
                              image_size=8, samples_per_epoch=40, seed=5, center_crop="none",
                              persistent_workers=False)
    return dm.train_dataloader()


def _keys(loader, n: int | None = None) -> list[list[str]]:
    got = []
    for batch in loader:
        got.append(list(batch["_key"]))
        if n is not None and len(got) == n:
            break
    return got


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_state_resumes_mid_epoch_exactly(tmp_path, workers):
    root = str(tmp_path / "digits")
    full = _loader(root, workers)
    epochs = [_keys(full), _keys(full)]  # two passes: epochs 0 and 1, 10 batches each
    assert len(epochs[0]) == 10 and epochs[0] != epochs[1]
    first = _loader(root, workers)
    _keys(first)  # epoch 0 whole
    head = _keys(first, 4)  # epoch 1, cut after 4 batches
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 4
    resumed = _loader(root, workers)
    resumed.load_state_dict(state)
    assert head + _keys(resumed) == epochs[1]
    # at the end of a pass the position moves to the start of the next epoch
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batches"] == 0


def test_loader_refuses_to_replay_another_layout(tmp_path, caplog):
    root = str(tmp_path / "digits")
    a = _loader(root, 0)
    _keys(a, 3)
    state = a.state_dict()
    state["layout"][1] = 99  # another batch size: another stream
    fresh = _loader(root, 0)
    fresh.load_state_dict(state)
    assert "not resuming mid-epoch" in caplog.text
    assert _keys(fresh, 2) == _keys(_loader(root, 0), 2)  # starts at the beginning instead


def test_step_rng_makes_dropout_a_function_of_the_step_and_leaves_the_global_rng_alone():
    from lightning_modules.resumable import step_rng

    drop = torch.nn.Dropout(0.5)
    x = torch.ones(64)
    before = torch.get_rng_state()
    with step_rng(123, torch.device("cpu")):
        a = drop(x)
    assert torch.equal(torch.get_rng_state(), before)  # code outside a step sees no difference
    torch.rand(10)  # whatever ran in between (sampling callbacks, data) does not matter
    with step_rng(123, torch.device("cpu")):
        b = drop(x)
    with step_rng(124, torch.device("cpu")):
        c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
