"""Two-rank Lightning DDP on CPU (gloo): ranks see disjoint samples, epochs hold the configured count,
orders change per epoch, and DataStatsCallback's all-reduced skip count equals the sum over ranks."""
import json
import os
import subprocess
import sys

import pytest

from data_helpers import make_shards

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow  # two Lightning processes + 4 DataLoader workers: ~17 s idle, ~30 s on a busy 2-core box
def test_ddp_two_ranks_disjoint_and_counted(tmp_path):
    data = str(tmp_path / "data")
    make_shards(data, 8, 8, prefix="train", bad={(0, 5): "garbage_jpg"})
    make_shards(data, 3, 5, prefix="val", bad={(1, 2): "bad_cls"})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    r = subprocess.run([sys.executable, os.path.join(HERE, "data_helpers.py"), "ddp", str(tmp_path)],
                       cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = []
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    for rec in ranks:
        assert rec["world"] == 2 and rec["len"] == 8  # 64 // (2 ranks x 2 workers) = 16 -> 4 batches x 2 workers
        assert sorted(rec["train"]) == ["0", "1"]
        assert all(len(keys) == 32 for keys in rec["train"].values())  # 64 per epoch globally
        assert rec["train"]["0"] != rec["train"]["1"]  # reshuffled per epoch (Lightning's set_epoch)
        assert "s0_005" not in rec["train"]["0"] + rec["train"]["1"]
    train = [set(rec["train"]["0"] + rec["train"]["1"]) for rec in ranks]
    assert not train[0] & train[1]
    val = [set(rec["val"]) for rec in ranks]
    assert not val[0] & val[1] and len(val[0] | val[1]) == 14  # 15 minus the bad cls
    assert ranks[0]["cb_skipped"] == ranks[1]["cb_skipped"] == ranks[0]["dm_skipped"] + ranks[1]["dm_skipped"]
    assert ranks[1]["dm_skipped"] >= 2  # rank 1 validated shard 1 (bad cls) in both epochs
    assert ranks[0]["cb_images"] == ranks[1]["cb_images"] == 2 * 64
