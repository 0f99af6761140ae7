"""Two CPU ranks for real: `python -m experiments.train` under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (Lightning
re-launches the script once per rank), then the ZeRO checkpoints exported and sampled in a fresh process in
which `import deepspeed` fails.

DeepSpeed JIT-compiles its shared-memory comm op on the very first run (about a minute, cached afterwards in
~/.cache/torch_extensions), hence the generous timeouts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TRAIN = [sys.executable, "-m", "experiments.train", "-c", "experiments/configs/debug_raster.yaml",
         "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_steps={STEPS}", "trainer.global_batch_size=8",
         "trainer.val_every_steps=1000", "trainer.ckpt_every_steps=1000", "trainer.limit_val_batches=1",
         "callbacks.sample_every_steps=2", "resume=never"]  # sampling on: under ZeRO-3 it once hung (#16)
ENV = subprocess_env(REPO, PYTHONUNBUFFERED="1")


def train(out_dir, name: str, *overrides: str) -> tuple[dict, str]:
    proc = subprocess.run([*TRAIN, f"out_dir={out_dir}", f"name={name}", *overrides], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed:\n{log[-4000:]}"
    with open(os.path.join(out_dir, name, "metrics.json")) as f:
        return json.load(f), log


def check_two_rank_run(metrics: dict, log: str) -> None:
    assert metrics["steps"] == STEPS and metrics["val_nll_bits"] is not None
    assert "global 8 = 4 per device x 2 rank(s) x 1 accumulation" in log  # BatchLayoutCheck saw 2 real ranks
    assert "MEMBER: 2/2" in log  # the second rank joined the process group


@pytest.mark.slow
def test_ddp_two_cpu_ranks(tmp_path):
    metrics, log = train(tmp_path, "ddp", "trainer.strategy=ddp")
    check_two_rank_run(metrics, log)
    assert os.path.isfile(tmp_path / "ddp" / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """ZeRO-2 and ZeRO-3, both with EMA (so the exports have EMA state to pick), trained once for the tests below."""
    out = tmp_path_factory.mktemp("zero")
    return out, {stage: train(out, f"zero{stage}", f"trainer.strategy=deepspeed_stage_{stage}", "callbacks.ema_decay=0.9")
                 for stage in (2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_cpu_ranks(zero_runs, stage):
    out, runs = zero_runs
    check_two_rank_run(*runs[stage])
    ckpt = out / f"zero{stage}" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "latest").is_file()  # a DeepSpeed checkpoint is a directory


SAMPLE_WITHOUT_DEEPSPEED = """
import sys

class BlockDeepSpeed:  # any import of deepspeed (or a submodule) fails in this process
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError(f"deepspeed is blocked in this test: {name}")

sys.meta_path.insert(0, BlockDeepSpeed())
import json, torch
from experiments.checkpoints import load_generator
for folder in sys.argv[1:]:
    module = load_generator(folder)
    codes = module.sample_codes(torch.arange(4) % 10, seed=0)
    assert not any(m == "deepspeed" or m.startswith("deepspeed.") for m in sys.modules)
    print(json.dumps({"shape": list(codes.shape), "max": int(codes.max()), "vocab": module.backbone.vocab_size}))
"""


@pytest.mark.slow
def test_zero_checkpoints_export_and_sample_without_deepspeed(zero_runs, tmp_path):
    from experiments.export import export

    out, _ = zero_runs
    folders = []
    for stage in (2, 3):
        info = export(str(out / f"zero{stage}" / "checkpoints" / "last.ckpt"), str(tmp_path / f"export{stage}"))
        assert info["ema"] is True  # ZeRO-3 included: its sharded EMA is saved whole (callbacks/ema.py)
        assert info["global_step"] == STEPS and info["config"]["trainer"]["strategy"] == f"deepspeed_stage_{stage}"
        folders.append(str(tmp_path / f"export{stage}"))
    # one fresh process for both exports: it cannot import deepspeed at all
    proc = subprocess.run([sys.executable, "-c", SAMPLE_WITHOUT_DEEPSPEED, *folders], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    for result in results:
        assert result["shape"] == [4, 8, 8] and 0 <= result["max"] < result["vocab"]


@pytest.mark.slow
def test_zero3_offload_trains_with_our_param_groups_and_lr_schedule(tmp_path):
    """ZeRO-Offload takes DeepSpeedCPUAdam as the client optimizer: the same two groups (no weight decay on norms
    and biases) and the same LambdaLR schedule as every other strategy, not a one-group optimizer from the config."""
    import torch

    metrics, _ = train(tmp_path, "offload", "trainer.devices=1", "trainer.strategy=deepspeed_stage_3_offload",
                       "callbacks.ema_decay=0.0", "optim.weight_decay=0.05", "optim.lr=3e-4", "optim.min_lr_ratio=0.05")
    assert metrics["steps"] == STEPS and metrics["val_nll_bits"] is not None
    ckpt = tmp_path / "offload" / "checkpoints" / "last.ckpt" / "checkpoint"
    saved = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False, map_location="cpu")  # DeepSpeed pickles its optimizer state
    groups = saved["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    # ARModule.lr_multiplier after the last of STEPS steps: the cosine has reached min_lr_ratio
    assert all(g["initial_lr"] == 3e-4 and abs(g["lr"] - 3e-4 * 0.05) < 1e-9 for g in groups)
