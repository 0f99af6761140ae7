"""The ordering zoo: fixed scans as an ordering, RAR towards any target scan, the sigma-GPT any-order arm, the
Halton policy, cross-order NLL, and a throwaway ordering added as one file + one registry line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_module, subprocess_env
from lightning_modules.sampling import generate
from lightning_modules.scans import SCANS, scan_order

N = 16


def decoded_positions(m, labels, **overrides) -> torch.Tensor:
    """long [B, N]: the positions in the order the sampler decoded them."""
    rec = []
    generate(m, labels, m.sample_settings(**overrides), torch.Generator().manual_seed(0), recorder=rec.append)
    return torch.cat([r["positions"] for r in rec], 1)


def test_scan_raster_is_exactly_the_raster_ordering():
    scan, raster = make_module("scan", scan="raster"), make_module("raster")
    codes = torch.randint(0, 11, (4, N), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert scan.loss_on(codes, labels, 0, None).item() == raster.loss_on(codes, labels, 0, None).item()
    assert torch.equal(scan.sample_codes(labels, seed=5, cfg_scale=2.0), raster.sample_codes(labels, seed=5,
                                                                                              cfg_scale=2.0))


@pytest.mark.parametrize("name", [s for s in SCANS if s != "raster"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_scan_ordering_trains_validates_and_samples_in_its_scan(name, grid):
    m = make_module("scan", grid=grid, scan=name, scan_seed=3)
    want = scan_order(name, grid, seed=3)
    assert torch.equal(m.ordering.train_order(2, 0, None), want.expand(2, -1))  # training
    assert torch.equal(m.ordering.eval_order("own", 2, None), want.expand(2, -1))  # validation NLL
    assert torch.equal(decoded_positions(m, torch.tensor([0, 1])), want.expand(2, -1))  # sampling
    assert not torch.equal(want, torch.arange(grid[0] * grid[1]))


def test_rar_anneals_towards_its_target_scan():
    m = make_module("rar", scan="zcurve", rar_anneal_start=0.5, rar_anneal_end=0.75)  # max_steps = 100
    z = scan_order("zcurve", (4, 4))
    g = torch.Generator().manual_seed(0)
    assert (m.ordering.train_order(32, 0, g) != z).any(1).float().mean() > 0.9  # r = 1: random orders
    assert torch.equal(m.ordering.train_order(32, 90, g), z.expand(32, -1))  # r = 0: the target scan
    assert torch.equal(decoded_positions(m, torch.tensor([0])), z[None])  # and it samples in it


def test_sigma_gpt_trains_in_random_orders_and_inpaints_with_every_kept_token_first():
    m = make_module("sigma_gpt")
    g = torch.Generator().manual_seed(0)
    a, b = m.ordering.train_order(2, 0, g), m.ordering.train_order(2, 10**6, g)
    assert not torch.equal(a[0], a[1]) and not torch.equal(b[0], b[1])  # random at every step, never annealed
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[3, 9, 15]] = True
    tokens = torch.randint(0, 11, (2, N), generator=g)
    rec = []
    out = generate(m, torch.tensor([0, 1]), m.sample_settings(num_steps=N - 3), g, known=(mask, tokens),
                   recorder=rec.append)
    assert torch.equal(out[:, mask], tokens[:, mask])
    first = torch.cat([r["positions"] for r in rec], 1)
    assert not mask[first].any()  # only the unknown positions are decoded, after all kept ones were fed


@pytest.mark.parametrize("variant", ["randar", "arpg", "sigma_gpt"])
def test_halton_policy_spreads_the_first_steps(variant):
    from lightning_modules.locality import mean_min_spread

    m = make_module(variant, grid=(8, 8))
    steps = 64 if variant == "sigma_gpt" else 8
    halton = m.ordering.decode_plan(16, steps, "halton", torch.Generator().manual_seed(0))
    rand = m.ordering.decode_plan(16, steps, m.sample_settings().schedule, torch.Generator().manual_seed(0))
    assert torch.equal(halton.order.sort(1).values, torch.arange(64).expand(16, -1))
    if variant != "sigma_gpt":  # parallel steps: step-mates further apart than under random orders
        assert mean_min_spread(halton.order, halton.counts, (8, 8)) > mean_min_spread(rand.order, rand.counts, (8, 8))


def test_eval_orders_and_token_nll():
    m = make_module("randar")
    codes = torch.randint(0, 11, (3, N), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    nll = {name: m.token_nll(codes, labels, torch.Generator().manual_seed(4),
                             order=m.ordering.eval_order(name, 3, torch.Generator().manual_seed(4)))
           for name in ("own", "random", "raster", "spiral_in")}
    assert all(v.shape == (3, N) and torch.isfinite(v).all() for v in nll.values())
    assert torch.equal(nll["own"], nll["random"])  # RandAR validates in fresh random orders
    assert not torch.equal(nll["raster"], nll["spiral_in"])


# ------------------------------------------------------------------------------------------------ through the CLI
def cli(args, cwd=REPO, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(cwd, PYTHONUNBUFFERED="1", **(env or {})))
    assert proc.returncode == 0, f"{' '.join(args)}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc.stdout + proc.stderr


TRAIN = ["experiments.train", "-c", "experiments/configs/debug_raster.yaml", "trainer.max_steps=4",
         "trainer.val_every_steps=2", "trainer.limit_val_batches=2", "callbacks.sample_every_steps=2",
         "callbacks.sample_per_class=1", "resume=never"]


@pytest.mark.slow
def test_cross_order_cli_writes_the_matrix(tmp_path):
    runs = []
    for spec in (["model.variant=scan", "model.scan=spiral_in"], ["model.variant=randar"]):
        name = spec[-1].split("=")[1]
        cli([*TRAIN, *spec, f"out_dir={tmp_path}", f"name={name}", f"data.root={tmp_path}/digits"])
        runs.append(str(tmp_path / name))
    out = tmp_path / "matrix"
    cli(["experiments.cross_order", "--runs", *runs, "--orders", "own,spiral_in,random", "--max-batches", "2",
         "--out", str(out)])
    data = json.loads((out / "cross_order.json").read_text())
    rows = {r["label"]: r["nll"] for r in data["rows"]}
    assert set(rows) == {"scan(spiral_in)", "randar"}
    assert rows["scan(spiral_in)"]["own"] == rows["scan(spiral_in)"]["spiral_in"]  # its own order is its scan
    assert rows["randar"]["own"] == rows["randar"]["random"]  # the same permutations for every run
    assert (out / "cross_order.png").is_file() and "eval: spiral_in" in (out / "cross_order.md").read_text()


REVERSE = '''"""A throwaway ordering for the plug-in test: raster order backwards."""
import torch

from lightning_modules.base import ARModule
from lightning_modules.raster import RasterOrdering


class ReverseOrdering(RasterOrdering):
    def scan_order(self, device=None):
        return torch.arange(self.num_positions - 1, -1, -1, device=device)


class ReverseModule(ARModule):
    ordering_class = ReverseOrdering
'''


@pytest.mark.slow
def test_a_new_ordering_is_one_file_plus_one_registry_line(tmp_path):
    repo = tmp_path / "repo"
    for part in ("lightning_modules", "datamodules", "tokenizers", "experiments"):
        shutil.copytree(os.path.join(REPO, part), repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "lightning_modules" / "reverse.py").write_text(REVERSE)
    registry = repo / "lightning_modules" / "variants.py"
    text = registry.read_text()
    anchor = '    "raster": "lightning_modules.raster:RasterModule",\n'
    assert anchor in text
    registry.write_text(text.replace(anchor, anchor + '    "reverse": "lightning_modules.reverse:ReverseModule",\n'))
    run = repo / "runs" / "rev"
    cli([*TRAIN, "model.variant=reverse", "out_dir=runs", "name=rev"], cwd=str(repo))  # train + validate + grids
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["variant"] == "reverse" and metrics["val_nll_bits"] is not None and metrics["steps"] == 4
    assert sorted(os.listdir(run / "samples"))  # the sample grid callback drew it
    out = cli(["experiments.sample", "--ckpt", str(run), "--out", str(repo / "samples"), "--per-class", "1"],
              cwd=str(repo))
    assert "reverse_steps64" in out
    # and the decode order really is the new one, read back from the checkpoint
    probe = ("import torch; from experiments.checkpoints import load_generator; m = load_generator('runs/rev'); "
             "rec = []; from lightning_modules.sampling import generate; "
             "generate(m, torch.tensor([0]), m.sample_settings(), None, recorder=rec.append); "
             "print([int(r['positions'][0, 0]) for r in rec][:3])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=str(repo), capture_output=True, text=True, timeout=300,
                          env=subprocess_env(str(repo)))
    assert proc.stdout.strip().endswith("[63, 62, 61]"), proc.stdout + proc.stderr[-2000:]
