"""Submit one training run, or the cartesian product of a sweep, through submitit (SLURM, local or in-process).

    # plan only: run names (deterministic, experiments.config.run_name), run folders, resources
    python -m experiments.launch -c experiments/configs/rar_B.yaml --sweep seed=0,1,2 --dry-run
    # 4 nodes x 8 GPUs on partition P, 48 h, an ordering sweep: one job per point
    python -m experiments.launch -c experiments/configs/rar_L.yaml -c experiments/configs/trainer/ddp.yaml \\
        --sweep model.variant=raster,rar,randar,arpg --nodes 4 --gpus-per-node 8 --partition P --time 2880
    # on this machine, in a subprocess (1 node): --executor local;  in this process (1 device): --executor debug

Each job runs ``experiments.train.run`` in every task (one task per device; Lightning reads the world from SLURM,
or from the torchrun-style variables set here for --executor local). A job resubmitted after a timeout or
pre-emption (submitit's checkpoint(): USR2, then requeue) calls the same run again, and resume=auto continues
from runs/<name>/checkpoints/last.ckpt: up to trainer.ckpt_every_steps of progress is redone. The sbatch template
(experiments/slurm/train.sbatch) checkpoints at the signal instead (Lightning's SIGUSR1 auto-requeue).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import zlib

from experiments.cli import fail
from experiments.config import ConfigError, load_config, run_name


# ----------------------------------------------------------------------------- the plan
def split_values(text: str) -> list[str]:
    """'a,b,[1,2]' -> ['a', 'b', '[1,2]']: commas inside brackets belong to the value (OmegaConf lists)."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> [['a=1','b=x'], ['a=1','b=y'], ['a=2','b=x'], ['a=2','b=y']] (in the given order)."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            fail(f"--sweep {item!r}: expected key.sub=v1,v2,...")
        axes.append([f"{key}={v}" for v in split_values(values)])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def build_plan(a) -> list[dict]:
    """One entry per job: its overrides, resolved config, run name and run folder."""
    configs = [os.path.abspath(c) for c in a.config]  # jobs may start in another working directory
    resources = [f"trainer.num_nodes={a.nodes}"] + ([f"trainer.devices={a.gpus_per_node}"] if a.gpus_per_node else [])
    plan, names = [], {}
    for point in sweep_points(a.sweep):
        overrides = [*a.overrides, *point, *resources]
        try:
            cfg = load_config(configs, overrides)
        except ConfigError as err:
            fail(f"config {err} (sweep point {' '.join(point) or '-'})")
        name = run_name(cfg)
        if name in names:
            fail(f"--sweep: points {names[name]} and {point} give the same run name {name!r} (set distinct name=...)")
        names[name] = point
        out_dir = os.path.abspath(cfg.out_dir)
        plan.append(dict(name=name, run_dir=os.path.join(out_dir, name), point=point, cfg=cfg, configs=configs,
                         overrides=[*overrides, f"out_dir={out_dir}"]))
    return plan


# ----------------------------------------------------------------------------- the job (runs in every task)
def torchrun_env_from_submitit() -> None:
    """--executor local starts one process per task without SLURM: give Lightning the torchrun-style variables
    (open_clip's world_info_from_env, in reverse), so it uses these processes instead of launching its own."""
    if "SLURM_JOB_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return  # SLURM: Lightning's SLURMEnvironment reads SLURM_* itself
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    port = 20000 + zlib.crc32(str(env.job_id).encode()) % 20000  # same in every task of the job, differs by job
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(env.num_tasks),
                      RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), NODE_RANK=str(env.node))


class TrainJob:
    """The submitted callable; submitit pickles it, so it holds only strings."""

    def __call__(self, configs: list[str], overrides: list[str]) -> dict:
        from experiments.signals import RunStopped, stop_status
        from experiments.train import run

        torchrun_env_from_submitit()
        try:
            return run(load_config(configs, overrides), quiet=True)
        except RunStopped as stop:  # saved at a step boundary: the job's log gets one line and exit 143 / 130
            raise SystemExit(stop_status(stop)) from None

    def checkpoint(self, configs: list[str], overrides: list[str]):
        """On timeout / pre-emption submitit requeues what this returns: the same run, which resumes (resume=auto)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(), configs, overrides)


def make_executor(a, first_cfg):
    import submitit

    folder = os.path.join(os.path.abspath(first_cfg.out_dir), "submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster=a.executor)
    params = dict(nodes=a.nodes, timeout_min=a.time, stderr_to_stdout=True,
                  cpus_per_task=a.cpus_per_task or first_cfg.data.num_workers + 1)
    if a.mem_gb:
        params["mem_gb"] = a.mem_gb
    if a.partition:
        params["slurm_partition"] = a.partition
    extra = dict(item.partition("=")[::2] for item in a.slurm)
    if extra:
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(slurm_signal_delay_s=90, **params)
    return executor


def wait_for(submitted) -> dict:
    """Rank 0's result (one per task; it holds the metrics written). Ctrl-C while waiting: --executor local's jobs
    got the same SIGINT (one process group) and save and stop at a step boundary; this process ends in one line."""
    try:
        return submitted.results()[0]
    except KeyboardInterrupt:
        fail(f"SIGINT: stopped waiting for job {submitted.job_id} (its run resumes with resume=auto)", 130)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", action="append", default=[], metavar="PRESET.yaml", help="YAML preset(s)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every job")
    p.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2",
                   help="one job per combination (cartesian product over all --sweep axes)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per job (sets trainer.num_nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="devices (= tasks; GPUs unless trainer.accelerator=cpu) per node; sets trainer.devices "
                        "(0: the config's)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="0: data.num_workers + 1")
    p.add_argument("--mem-gb", type=int, default=0, help="memory per node (0: the partition's default)")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", type=int, default=60, help="time limit per job, minutes")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any further sbatch option, e.g. --slurm account=abc --slurm constraint=a100")
    p.add_argument("--executor", choices=("slurm", "local", "debug"), default="slurm")
    p.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for every job; exit 1 if one failed")
    a = p.parse_intermixed_args(argv)  # overrides may sit between options
    if not a.config:
        fail("-c: give at least one preset (e.g. -c experiments/configs/debug_raster.yaml)")
    if a.nodes < 1 or a.gpus_per_node < 0:
        fail(f"--nodes {a.nodes} must be >= 1 and --gpus-per-node {a.gpus_per_node} >= 0")
    plan = build_plan(a)
    t = plan[0]["cfg"].trainer
    if a.executor != "slurm" and a.nodes > 1:
        fail(f"--executor {a.executor} runs on this machine only: use --nodes 1")
    if a.executor == "debug" and t.devices * t.num_nodes > 1:
        fail("--executor debug runs in this process, so one device only: use --executor local for more")
    print(f"roar: {len(plan)} job(s), {a.nodes} node(s) x {t.devices} task(s) each, executor {a.executor}")
    for job in plan:
        print(f"  {job['name']}  {job['run_dir']}  {' '.join(job['point']) or '(no sweep)'}")
    if a.dry_run:
        return 0
    if importlib.util.find_spec("submitit") is None:  # an optional extra: say so instead of a traceback
        fail("--executor: submitit is not installed (pip install 'roar[slurm]')")
    executor = make_executor(a, plan[0]["cfg"])
    jobs = []
    for job in plan:
        devices = job["cfg"].trainer.devices  # one task per device; GPUs requested unless training on CPU
        gpus = {} if job["cfg"].trainer.accelerator == "cpu" else {"gpus_per_node": devices}
        executor.update_parameters(name=job["name"], tasks_per_node=devices, **gpus)
        submitted = executor.submit(TrainJob(), job["configs"], job["overrides"])
        jobs.append(submitted)
        print(f"submitted job {submitted.job_id}: {job['name']} -> {job['run_dir']}", flush=True)
    if not a.wait:
        return 0
    failed = 0
    for job, submitted in zip(plan, jobs):
        try:
            result = wait_for(submitted)
            print(f"done job {submitted.job_id}: {job['name']}: {result.get('steps')} steps, "
                  f"val NLL {result.get('val_nll_bits')}")
        except Exception as err:  # noqa: BLE001  one failed job must not hide the others
            failed += 1
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"FAILED job {submitted.job_id}: {job['name']}: {reason} (log: {submitted.paths.stdout})",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
