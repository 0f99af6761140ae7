"""Cross-order evaluation: the validation NLL of trained runs under any decode order -> a train x eval matrix.

    python -m experiments.cross_order --runs runs/demo/raster runs/demo/randar --orders own,raster,random,spiral_in \\
        --out runs/demo/cross_order
    python -m experiments.cross_order --runs 'runs/ablations/study/*' --max-batches 4 --out ...

Rows are runs (their ordering, plus the scan for scan / RAR runs), columns are evaluation orders: ``own`` (the
order the run validates in: the end of its training schedule), ``random`` (a fresh permutation per sample) or any
scan of lightning_modules/scans.py. Every run sees the same val batches and, per batch, the same random
permutations (generators seeded by the batch index), so a column compares models on identical orders. NLL is in
bits per token of each run's own vocabulary. A fixed-order model evaluated in another order is out of its
training distribution by design: the matrix measures exactly how much (how a model trained in one order does
when decoded in another). Writes ``<out>/cross_order.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import torch

from experiments.cli import fail

DEFAULT_ORDERS = "own,raster,random"


def run_label(module) -> str:
    m = module.model_cfg
    return m.variant + (f"({m.scan})" if "scan" in module.ordering.reads else "")


def val_batches(run_dir: str, max_batches: int, batch_size: int):
    """The run's own validation data (from its config.yaml), ``max_batches`` batches (0 = all)."""
    from experiments.build import build_datamodule
    from experiments.config import load_config

    cfg = load_config([os.path.join(run_dir, "config.yaml")], [f"trainer.global_batch_size={batch_size}",
                                                               "trainer.devices=1", "trainer.num_nodes=1"])
    dm, _ = build_datamodule(cfg, batch_size)
    dm.setup("validate")
    for i, batch in enumerate(dm.val_dataloader()):
        if max_batches and i >= max_batches:
            break
        yield i, batch


@torch.no_grad()
def order_nll(module, batches, orders: list[str], seed: int = 0) -> dict[str, float]:
    """{eval order: mean NLL in bits/token} over ``batches`` (the same permutations for every module)."""
    from lightning_modules.base import derive_seed, make_generator

    totals = {o: 0.0 for o in orders}
    count = 0
    for i, batch in batches:
        codes = module.codes_from_batch(batch)
        labels = batch["label"].to(module.device)
        for name in orders:
            g = make_generator(derive_seed(seed, 11, i), module.device)  # per batch, shared by every run
            order = module.ordering.eval_order(name, codes.shape[0], g, module.device)
            nll = module.token_nll(codes, labels, g, order=order)  # [B, N] nats
            totals[name] += float(nll.sum())
        count += codes.numel()
    return {o: totals[o] / count / math.log(2) for o in orders}


def markdown(rows: list[dict], orders: list[str]) -> str:
    head = "| run (train order) | " + " | ".join(f"eval: {o}" for o in orders) + " |"
    sep = "|---|" + "|".join("---" for _ in orders) + "|"
    body = [f"| {r['label']} | " + " | ".join(f"{r['nll'][o]:.4f}" for o in orders) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def heatmap(rows: list[dict], orders: list[str], path: str) -> str:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.array([[r["nll"][o] for o in orders] for r in rows])
    fig = Figure(figsize=(1.4 + 1.1 * len(orders), 0.9 + 0.45 * len(rows)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(orders)), [f"eval: {o}" for o in orders], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="white" if v > values.mean() else "black")
    fig.colorbar(im, ax=ax, label="val NLL (bits/token)")
    fig.savefig(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders (runs/<name>/, glob patterns allowed)")
    p.add_argument("--orders", default=DEFAULT_ORDERS, help=f"comma-separated eval orders (default {DEFAULT_ORDERS})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-batches", type=int, default=0, help="val batches per run (0 = the whole split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the random eval permutations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    from experiments.checkpoints import CheckpointError, load_generator
    from lightning_modules.scans import SCANS

    orders = [o for o in a.orders.split(",") if o]
    for o in orders:
        if o not in ("own", "random", *SCANS):
            fail(f"--orders: unknown order {o!r} (own, random or a scan: {', '.join(SCANS)})")
    runs = [r for pattern in a.runs for r in (sorted(glob.glob(pattern)) or [pattern])]
    rows, t0 = [], time.time()
    for run in runs:
        try:
            module = load_generator(run).to(a.device).eval()
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            fail(str(err).splitlines()[0])
        nll = order_nll(module, val_batches(run, a.max_batches, a.batch_size), orders, a.seed)
        rows.append({"run": run, "label": run_label(module), "nll": nll})
        print(f"cross_order: {run} ({rows[-1]['label']}): " + " ".join(f"{o}={v:.4f}" for o, v in nll.items()),
              flush=True)
    os.makedirs(a.out, exist_ok=True)
    table = markdown(rows, orders)
    with open(os.path.join(a.out, "cross_order.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "cross_order.json"), "w") as f:
        json.dump({"orders": orders, "rows": rows, "seed": a.seed, "max_batches": a.max_batches}, f, indent=1)
    png = heatmap(rows, orders, os.path.join(a.out, "cross_order.png"))
    print("\n" + table + "\n")
    print(f"cross_order: {len(rows)} runs x {len(orders)} orders in {time.time() - t0:.0f} s -> {a.out}/ "
          f"(cross_order.md, .json, {os.path.basename(png)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
