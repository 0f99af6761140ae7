"""A real single-node SLURM (.ci/setup_slurm.sh): the sbatch template with 2 tasks, SIGUSR1 -> checkpoint ->
requeue -> resume, and a submitit sweep of 2 jobs. Skipped only when SLURM cannot be installed or started here.

SIGUSR1 is handled by experiments.strategies.SlurmRequeue (Lightning's own in-handler auto-requeue can deadlock
DDP, see there): at the next optimizer step all ranks save checkpoints/last.ckpt, rank 0 runs `scontrol requeue`,
SLURM's SIGTERM ends the attempt, and the requeued job (same id, same arguments, same run name) resumes from
last.ckpt through resume=auto. SLURM holds a requeued job for about 2 minutes (reason BeginTime): the test
releases it with `scontrol update StartTime=now` to stay short.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from slurm_helpers import REPO, job_state, read, run, slurm_unavailable, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TINY = ["-c", "experiments/configs/debug_raster.yaml", "trainer.accelerator=cpu", "trainer.global_batch_size=8",
        "trainer.val_every_steps=1000", "trainer.limit_val_batches=1", "callbacks.sample_every_steps=0"]


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")


def test_sbatch_two_tasks_sigusr1_checkpoints_requeues_and_resumes(tmp_path):
    steps = 200  # long enough for the signal to land mid-training (5-30 s), short for the resumed attempt
    log = str(tmp_path / "job.out")
    job = run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
               "--job-name=roar-requeue", "experiments/slurm/train.sbatch", *TINY, "trainer.strategy=ddp",
               f"trainer.max_steps={steps}", f"trainer.ckpt_every_steps={10 * steps}", f"out_dir={tmp_path}",
               "name=requeue"], cwd=REPO, env=dict(os.environ, ROAR_PYTHON=sys.executable)).split(";")[0]
    try:
        # "batch layout ok" comes after the first optimizer step, i.e. once every rank has its handlers
        wait_for(lambda: "batch layout ok" in read(log), 180, "training to start (first attempt)", poll=0.2)
        run(["scancel", "--signal=USR1", job])  # what --signal=SIGUSR1@90 sends before the time limit
        wait_for(lambda: job_state(job).startswith("PENDING") or not job_state(job), 120, "the job to be requeued")
        assert job_state(job), "the job left the queue instead of being requeued"
        run(["scontrol", "update", f"jobid={job}", "StartTime=now"])
        wait_for(lambda: not job_state(job), 240, "the requeued job to finish")
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- job log (tail) ---\n{read(log)[-5000:]}") from None
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = read(log)
    last = os.path.join(str(tmp_path), "requeue", "checkpoints", "last.ckpt")
    first, _, second = text.partition("attempt 2")
    saved_at = int(first.split("roar: requeue signal: saved")[1].split("at step ")[1].split(";")[0])
    assert f"requeued SLURM job {job}" in first and "val NLL" not in first, text[-3000:]  # cut short
    assert 0 < saved_at < steps, saved_at
    assert f"Restored all states from the checkpoint at {last}" in second, text[-3000:]
    # the resumed attempt's first step continues right after the step saved at the signal
    resumed_at = int(second.split("batch layout ok")[1].split("(step ")[1].split(")")[0])
    assert resumed_at == saved_at + 1, (saved_at, resumed_at)
    assert "global 8 = 4 per device x 2 rank(s)" in second  # srun started 2 tasks, Lightning made them 2 ranks
    metrics = json.loads(read(os.path.join(str(tmp_path), "requeue", "metrics.json")))
    assert metrics["steps"] == steps and metrics["resumed_from"] == last


def test_submitit_sweep_of_two_jobs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.launch", *TINY, "trainer.max_steps=3",
                           f"out_dir={tmp_path}", "--sweep", "seed=0,1", "--executor", "slurm", "--time", "10",
                           "--wait"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    submitted = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("submitted job")]
    assert len(submitted) == 2 and len({s[2] for s in submitted}) == 2  # two distinct SLURM job ids
    for line in submitted:
        run_dir = line[-1]
        metrics = json.loads(read(os.path.join(run_dir, "metrics.json")))
        assert metrics["steps"] == 3 and metrics["run"] == os.path.basename(run_dir)
    assert {json.loads(read(os.path.join(s[-1], "metrics.json")))["seed"] for s in submitted} == {0, 1}
