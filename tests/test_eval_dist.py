"""Rank sync of FeatureStats over two real gloo processes: the path FIDCallback relies on under DDP.

Kept apart from the Lightning tests so the spawned children import only torch/torchmetrics (faster start).
"""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lightning_modules.metrics.scores import FeatureStats


def _dist_worker(rank, world, port, feats, logits, plans, out_dir):
    """One gloo rank: for each plan, accumulate this rank's batches, compute (syncs), save the result."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for p, plan in enumerate(plans):
        metric = FeatureStats(feats.shape[1], logits.shape[1], total=len(feats))
        for idx in plan[rank]:
            metric.update(feats[idx], logits[idx], idx)
        out = metric.compute()
        np.savez(os.path.join(out_dir, f"plan{p}-rank{rank}.npz"), mu=out["mu"], sigma=out["sigma"], IS=out["is"])
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # whole-CLI / multi-process run: the slow tier (make test-slow)
def test_feature_stats_sync_across_gloo_ranks(tmp_path):
    """Two real processes (gloo) give the single-process statistics, also when one rank draws no batch."""
    from lightning_modules.callbacks.fid import eval_plan  # parent only: children skip importing Lightning

    g = torch.Generator().manual_seed(0)
    feats, logits = torch.randn(70, 6, generator=g), torch.randn(70, 4, generator=g)
    world = 2
    plans = []
    for batch_size in (30, 70):  # 30: batches 0 and 2 on rank 0, 1 on rank 1 (uneven); 70: rank 1 draws nothing
        plans.append([[idx for _, _, idx, _ in eval_plan(70, 10, batch_size, seed=0, rank=r, world_size=world)]
                      for r in range(world)])
    assert [len(p) for p in plans[0]] == [2, 1] and [len(p) for p in plans[1]] == [1, 0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(world, port, feats, logits, plans, str(tmp_path)), nprocs=world, join=True)
    single = FeatureStats(6, 4, total=70)
    single.update(feats, logits, torch.arange(70))
    want = single.compute()
    for p in range(len(plans)):
        for rank in range(world):
            got = np.load(tmp_path / f"plan{p}-rank{rank}.npz")
            np.testing.assert_allclose(got["mu"], want["mu"], rtol=1e-12)
            np.testing.assert_allclose(got["sigma"], want["sigma"], rtol=1e-10)
            assert float(got["IS"]) == pytest.approx(want["is"], rel=1e-12)
