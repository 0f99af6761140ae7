"""Helpers for the `slurm` tests: bring up the local single-node SLURM (.ci/setup_slurm.sh) and watch jobs."""
from __future__ import annotations

import os
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(REPO, ".ci", "setup_slurm.sh")
_status: str | None = None  # None = not tried yet; "" = up; else the reason it is not


def slurm_unavailable() -> str:
    """'' when a local SLURM is up (starting it once per session if needed), else why not (the skip reason)."""
    global _status
    if _status is None:
        try:
            proc = subprocess.run(["bash", SETUP], capture_output=True, text=True, timeout=300)
            out = (proc.stdout + proc.stderr).strip().splitlines()
            _status = "" if proc.returncode == 0 else (out[-1] if out else f"{SETUP} exited {proc.returncode}")
        except (OSError, subprocess.TimeoutExpired) as err:
            _status = f"{SETUP}: {err}"
    return _status


def run(cmd: list[str], **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


def job_state(job_id: str) -> str:
    """'STATE REASON' from squeue, '' once the job has left the queue."""
    return run(["squeue", "-h", "-j", job_id, "-o", "%T %r"]) if job_id else ""


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll ``predicate()`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
