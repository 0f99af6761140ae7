"""val/nll (and its order quarters) under DDP is the sample-weighted mean over every rank's validation samples,
whatever their split: the value one process gets on the whole set. Lightning's sync_dist mean divided the summed
losses by the MEAN integer sample count (gloo: 359 samples on 2 ranks -> 179, not 179.5), so an uneven split
was off by up to 1/count (digits: 4.0738 bits logged for 4.0624).

    python tests/test_val_nll_ddp.py OUT   # the driver: 2 CPU ranks validate, rank 0 writes OUT/ddp.json
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEMO = os.path.join(ROOT, "experiments", "configs", "demo", "raster.yaml")
# rank 0 validates 3 batches of 8, rank 1 one batch of 5: 29 samples, a mean count of 14.5
RANK_BATCHES = {0: [(0, 8), (8, 16), (16, 24)], 1: [(24, 29)]}
KEYS = ["val/nll", *(f"val/nll_by_order_q{q}" for q in range(1, 5))]


def build_module(out: str):
    import torch

    from experiments.build import build_lightning_module
    from experiments.config import load_config

    # raster order: validation draws nothing, so the per-rank generators cannot make the two runs differ
    module = build_lightning_module(load_config([DEMO], ["model.size=debug"]), (8, 8))
    module.load_state_dict(torch.load(os.path.join(out, "weights.pt"), weights_only=True))
    return module


def val_batches(ranks) -> list[dict]:
    import torch

    from datamodules.digits import digits_arrays

    images, labels = digits_arrays("val", 0)
    images = torch.from_numpy(images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(labels).long()
    return [{"image": images[a:b], "label": labels[a:b]} for r in ranks for a, b in RANK_BATCHES[r]]


def validate(out: str, devices: int) -> dict:
    import lightning as L
    import torch

    class Data(L.LightningDataModule):
        def val_dataloader(self):
            dist = torch.distributed.is_initialized()
            ranks = [torch.distributed.get_rank()] if dist else sorted(RANK_BATCHES)
            return torch.utils.data.DataLoader(val_batches(ranks), batch_size=None)

    # use_distributed_sampler=False: each rank keeps the batches given (Lightning would re-split them)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        use_distributed_sampler=False)
    trainer.validate(build_module(out), datamodule=Data(), verbose=False)
    return {"rank": trainer.global_rank, **{k: float(trainer.callback_metrics[k]) for k in KEYS}}


def driver(out: str) -> None:
    got = validate(out, devices=2)
    if got["rank"] == 0:
        with open(os.path.join(out, "ddp.json"), "w") as f:
            json.dump(got, f)


@pytest.mark.slow  # two ranks start: ~20 s
def test_ddp_val_nll_with_an_uneven_split_equals_one_process(tmp_path):
    import torch

    from conftest import subprocess_env
    from experiments.build import build_lightning_module
    from experiments.config import load_config

    torch.manual_seed(0)
    module = build_lightning_module(load_config([DEMO], ["model.size=debug"]), (8, 8))
    with torch.no_grad():  # the output head starts at zero: give every token a non-uniform prediction
        for p in module.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    env = subprocess_env(ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    one = validate(str(tmp_path), devices=1)
    # the per-sample mean over all 29, straight from the module (bits): what both must log
    module = build_module(str(tmp_path)).eval()
    batch = {k: torch.cat([b[k] for b in val_batches(sorted(RANK_BATCHES))]) for k in ("image", "label")}
    with torch.no_grad():
        nll = module.token_nll(module.codes_from_batch(batch), batch["label"], None).double() / math.log(2)
    want = [nll.mean(), *(part.mean() for part in nll.tensor_split(4, dim=1))]
    for key, value in zip(KEYS, want):  # the batch means differ by far more than the tolerance
        assert abs(one[key] - float(value)) <= 1e-5 * abs(float(value)), (key, one[key], float(value))
        assert abs(ddp[key] - float(value)) <= 1e-5 * abs(float(value)), (key, ddp[key], float(value))


if __name__ == "__main__":
    driver(sys.argv[1])
