"""One rank vs two: the same global batch and seed give the same loss curve (DDP, and DeepSpeed ZeRO-2).

Why a special data module: the shard DataModules split shards per rank and seed their shuffles by rank, so a
1-rank and a 2-rank run never see the same global batches. Here every step's GLOBAL batch is a fixed index set
(seeded by the step only) and each (rank, micro-batch) slot takes its contiguous slice, so the only differences
left are the ones under test: gradient averaging across ranks vs accumulation on one rank, the batch layout,
clipping and the optimizer step. Raster order, class_dropout=0 and no dropout remove every per-rank random draw.
The rest of the run is the real `experiments.train` (config, builders, trainer, strategy, checkpointing).

    python tests/test_scale_parity.py OUT -c experiments/configs/demo/raster.yaml key=value ...   # the driver
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STEPS = 6
COMMON = ["-c", "experiments/configs/demo/raster.yaml", "model.size=debug", "model.class_dropout=0.0",
          f"trainer.max_steps={STEPS}", "trainer.global_batch_size=8", "trainer.accelerator=cpu",
          "trainer.val_every_steps=1000", "trainer.ckpt_every_steps=1000", "callbacks.sample_every_steps=0",
          "callbacks.ema_decay=0.0", "optim.warmup_steps=0", "seed=3", "resume=never"]
# float32 throughout; the arms differ only in summation order (all-reduce vs accumulation, ZeRO's flat buffers)
TOL = 1e-5  # absolute, on losses of about 2.8 nats; the curve itself moves by > 10,000 x TOL over the run


# ----------------------------------------------------------------------------- driver (runs once per rank)
def global_batch_datamodule(micro: int, accumulate: int, global_batch: int, seed: int):
    import lightning as L
    import torch

    from datamodules.digits import digits_arrays

    images, labels = digits_arrays("train", 0)  # [N, 8, 8] uint8, [N]
    images = torch.from_numpy(images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # grey -> [N, 3, 8, 8]
    labels = torch.from_numpy(labels).long()
    val_images, val_labels = digits_arrays("val", 0)
    val_images = torch.from_numpy(val_images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    val_labels = torch.from_numpy(val_labels).long()

    class Slices(torch.utils.data.IterableDataset):
        def __iter__(self):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            for step in range(10 * STEPS):
                g = torch.Generator().manual_seed(seed * 100_003 + step)
                chosen = torch.randperm(len(labels), generator=g)[:global_batch]  # the step's global batch
                for a in range(accumulate):
                    idx = chosen[(rank * accumulate + a) * micro:][:micro]
                    yield {"image": images[idx], "label": labels[idx]}

    class GlobalBatchData(L.LightningDataModule):
        batch_size = micro

        def train_dataloader(self):
            return torch.utils.data.DataLoader(Slices(), batch_size=None)

        def val_dataloader(self):
            # a fixed set of 32 in batches of 8, split evenly over ranks: the synced mean is the global mean
            rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                           if torch.distributed.is_initialized() else (0, 1))
            idx = torch.arange(32).view(-1, 8)[rank::world]
            batches = [{"image": val_images[i], "label": val_labels[i]} for i in idx]
            return torch.utils.data.DataLoader(batches, batch_size=None)  # a bare list would be many loaders

    return GlobalBatchData()


def driver(out: str, argv: list[str]) -> None:
    import experiments.build as build
    from experiments.config import batch_layout
    from experiments.train import main

    recorded: list = []  # (rank, loss) of every micro-batch, in order

    def datamodule(cfg, micro):
        _, _, accumulate = batch_layout(cfg)
        return global_batch_datamodule(micro, accumulate, cfg.trainer.global_batch_size, cfg.seed), (8, 8)

    original_module = build.build_lightning_module

    def lightning_module(cfg, grid):
        module = original_module(cfg, grid)
        step = module.training_step

        def recording_step(batch, batch_idx):
            loss = step(batch, batch_idx)
            recorded.append((module.global_rank, float(loss.detach())))
            return loss

        module.training_step = recording_step
        return module

    build.build_datamodule, build.build_lightning_module = datamodule, lightning_module
    main(argv)
    rank = recorded[0][0] if recorded else 0
    with open(os.path.join(out, f"losses-rank{rank}.json"), "w") as f:
        json.dump([loss for _, loss in recorded], f)


# ----------------------------------------------------------------------------- test
def run_arm(tmp_path, name: str, extra: list[str]) -> tuple[list[float], list[list[float]], float]:
    """Per-step GLOBAL loss of one arm (the mean over ranks and micro-batches, all of one size), the per-rank
    micro-batch losses, and the final val NLL of metrics.json (a fixed set, split over the ranks)."""
    out = tmp_path / name
    out.mkdir()
    cmd = [sys.executable, os.path.abspath(__file__), str(out), *COMMON, f"out_dir={tmp_path}/runs",
           f"name={name}", *extra]
    from conftest import subprocess_env  # here, not at the top: this file also runs as the ranks' script

    env = subprocess_env(ROOT, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ranks = sorted(out.glob("losses-rank*.json"))
    micro = [json.loads(p.read_text()) for p in ranks]  # per rank: the micro-batch losses in order
    per_rank_steps = len(micro[0]) // STEPS
    assert all(len(m) == STEPS * per_rank_steps for m in micro), [len(m) for m in micro]
    steps = [sum(m[k * per_rank_steps + a] for m in micro for a in range(per_rank_steps))
             / (len(micro) * per_rank_steps) for k in range(STEPS)]
    val = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["val_nll_bits"]
    return steps, micro, val


@pytest.mark.slow
def test_one_rank_and_two_ranks_reach_the_same_loss(tmp_path):
    # one rank: 2 micro-batches of 4 accumulated; two ranks: 4 each, gradients averaged by DDP / ZeRO-2
    single, _, single_val = run_arm(tmp_path, "single", ["trainer.devices=1", "trainer.micro_batch_size=4"])
    ddp, ddp_micro, ddp_val = run_arm(tmp_path, "ddp", ["trainer.devices=2", "trainer.strategy=ddp"])
    zero2, _, zero2_val = run_arm(tmp_path, "zero2", ["trainer.devices=2", "trainer.strategy=deepspeed_stage_2"])
    print(f"single {single} val {single_val}\nddp    {ddp} val {ddp_val}\nzero2  {zero2} val {zero2_val}")
    # not trivially equal: the ranks see different halves of each batch, and training moves the loss a lot.
    # Step 0 is ln(17) on every rank (the output head starts at zero); from step 1 on, each loss depends on
    # the data and on every earlier update, i.e. on the averaged gradients and the optimizer steps.
    assert abs(ddp_micro[0][1] - ddp_micro[1][1]) > 100 * TOL
    assert single[0] - single[-1] > 1000 * TOL
    for k in range(STEPS):
        assert abs(single[k] - ddp[k]) < TOL, f"step {k}: single {single[k]:.6f} vs ddp {ddp[k]:.6f}"
        assert abs(single[k] - zero2[k]) < TOL, f"step {k}: single {single[k]:.6f} vs zero2 {zero2[k]:.6f}"
    # and the trained weights agree: the final val NLL (bits) on a fixed set, after the last update
    assert abs(single_val - ddp_val) < TOL and abs(single_val - zero2_val) < TOL, (single_val, ddp_val, zero2_val)


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2:])
