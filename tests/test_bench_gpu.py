"""The GPU suite (experiments/bench_gpu.py, `make bench-gpu`): its dry run on the CPU, its unit order and time
budget, a failed unit that does not cost the others, the results on disk after every unit (a lease's limit can kill
the run), and the environment the device command gives the GPU tests. No timing assertions."""
from __future__ import annotations

import json

import pytest

from experiments.bench import main as bench_main


@pytest.mark.slow  # whole-CLI / multi-process run: the slow tier (make test-slow)
def test_gpu_suite_dry_run_writes_json_and_markdown(tmp_path, monkeypatch):
    """`make bench-gpu-dry`: the GPU suite's code on the CPU at toy sizes (two orderings here, to keep it short;
    the pytest subprocess is stubbed: it is one fixed command line, and tests/test_gpu.py has its own run)."""
    import experiments.bench_gpu as bench_gpu

    calls = []
    monkeypatch.setattr(bench_gpu, "gpu_tests", lambda timeout, dry, log: calls.append(dry) or
                        {"rc": 0, "summary": "stub", "command": "pytest -m gpu", "seconds": 0.0, "dry_run": dry})
    out = str(tmp_path / "gpu.json")
    rc = bench_main(["all", "--suite", "gpu", "--dry-run", "--variants", "raster,arpg", "--threads", "1",
                     "--out", out])
    assert rc == 0 and calls == [True]
    res = json.load(open(out))
    assert res["machine"]["device"] == "cpu" and res["suite"]["dry_run"] and res["skipped"] == []
    sample = res["sample"]["results"]
    assert {(r["variant"], r["batch"]) for r in sample} == {(v, b) for v in ("raster", "arpg") for b in (1, 2)}
    assert {r["steps"] for r in sample if r["variant"] == "arpg"} == {4, 2}  # headline_steps, scaled to 16
    assert all(r["precision"] == "bf16" and r["cfg"] == 4.0 and r["kernels"] == "aten" for r in sample)
    assert {(r["batch"], r["compile"]) for r in sample} == {(1, "off"), (1, "on"), (2, "on")}  # eager: batch 1
    assert all("speedup_vs_eager" in r for r in sample if (r["batch"], r["compile"]) == (1, "on"))
    assert all(r["gflop"] > 0 and "mfu" in r and "peak_mem_mb" in r for r in sample)
    train = res["train"]["results"]
    assert {r["variant"] for r in train} == {"raster", "arpg"}
    assert all(r["dtype"] == "bf16" and r["compile"] and "mfu" in r and "peak_mem_mb" in r for r in train)
    md = open(str(tmp_path / "gpu.md")).read()
    assert "## GPU tests" in md and "## Sampling" in md and "## Training step" in md


def test_gpu_suite_names_a_missing_package_in_one_line(monkeypatch, capsys):
    import experiments.bench_gpu as bench_gpu

    assert bench_gpu.preflight() is None
    line = bench_gpu.preflight(["json", "a_package_that_is_not_there_xyz"])
    assert "a_package_that_is_not_there_xyz" in line and "\n" not in line
    monkeypatch.setattr(bench_gpu, "SUITE_MODULES", ("sklearn_missing_for_test",))
    monkeypatch.setattr(bench_gpu.preflight, "__defaults__", (("sklearn_missing_for_test",),))
    assert bench_main(["all", "--suite", "gpu", "--dry-run", "--out", "unused.json"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_test_subprocesses_keep_the_packages_carried_on_pythonpath(tmp_path, monkeypatch):
    """On the GPU image roar's missing packages arrive through PYTHONPATH (docs/benchmarks.md, "On a lent GPU"); the
    CLI runs of tests/test_gpu.py (bf16-mixed, DeepSpeed) must still import them, with this checkout first."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    carried = tmp_path / "site"
    (carried / "carried_pkg").mkdir(parents=True)
    (carried / "carried_pkg" / "__init__.py").write_text("VALUE = 7\n")
    monkeypatch.setenv("PYTHONPATH", str(carried))
    probe = "import carried_pkg, experiments, sys; print(carried_pkg.VALUE, experiments.__file__)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=str(tmp_path), env=subprocess_env(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value, where = proc.stdout.split()
    assert value == "7" and where.startswith(REPO)


def test_gpu_suite_runs_the_speed_claims_first_and_skips_what_the_budget_cannot_hold(tmp_path, monkeypatch):
    """The unit order of a real (not dry) GPU run, with the measurements stubbed: batch-1 sampling at L of the
    claims' orderings (raster, ARPG, RandAR) before anything else, then B, and a unit is skipped, and listed, once
    the budget cannot hold the longest unit of its kind."""
    import types

    import experiments.bench as bench
    import experiments.bench_gpu as bench_gpu
    import experiments.bench_sample as bench_sample
    import experiments.bench_train as bench_train

    calls, clock = [], [0.0]
    monkeypatch.setattr(bench_gpu, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))  # the suite's clock

    def fake_sample(variants, sizes, batches, **kw):
        calls.append(("sample", variants[0], sizes[0], batches[0], tuple(kw["compiles"])))
        clock[0] += 40.0
        return {"results": []}

    def fake_train(variants, sizes, **kw):
        calls.append(("train", variants[0], sizes[0]))
        clock[0] += 50.0
        return {"results": []}

    monkeypatch.setattr(bench_sample, "bench_sample", fake_sample)
    monkeypatch.setattr(bench_train, "bench_train", fake_train)
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: {})
    monkeypatch.setattr(bench_gpu, "gpu_tests", lambda timeout, dry, log: {"rc": 0, "timeout": timeout})
    a = bench.parse_args(["all", "--suite", "gpu", "--variants", "rar,randar,arpg,raster", "--budget-s", "400",
                          "--out", str(tmp_path / "gpu.json")])
    results = bench_gpu.run_suite(a, {})
    assert results["gpu_tests"]["timeout"] == 200.0  # half the budget, at most 300 s
    assert calls[:3] == [("sample", v, "L", 1, ("off", "on")) for v in ("raster", "arpg", "randar")]
    assert calls[3:7] == [("sample", v, "B", 1, ("off", "on")) for v in ("raster", "arpg", "randar", "rar")]
    assert calls[7] == ("train", "raster", "B")  # 280 s used, 120 left: the 60 s default of a B step fits
    assert len(calls) == 9 and results["skipped"][0] == "train B randar (budget)"  # 50 s seen, 20 left
    assert "sample L batch 1 rar (budget)" in results["skipped"] and "train L raster (budget)" in results["skipped"]


class Killed(BaseException):
    """The lease's time limit, as the suite sees it: nothing after it runs."""


def test_gpu_suite_goes_on_past_a_failed_unit_and_keeps_every_finished_figure_on_disk(tmp_path, monkeypatch, capsys):
    """One unit's failure (an OOM) is one line under `errors` and the others still run; the JSON on disk is rewritten
    after every unit, so a run killed mid-unit (at the device call's limit) keeps each figure it finished."""
    import types

    import experiments.bench as bench
    import experiments.bench_gpu as bench_gpu
    import experiments.bench_sample as bench_sample
    import experiments.bench_train as bench_train

    out = tmp_path / "gpu.json"
    calls, clock, on_disk = [], [0.0], []
    monkeypatch.setattr(bench_gpu, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def fake_sample(variants, sizes, batches, **kw):
        unit = (variants[0], sizes[0], batches[0])
        calls.append(unit)
        on_disk.append(json.loads(out.read_text()) if out.exists() else None)
        clock[0] += 10.0
        if unit == ("arpg", "L", 1):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(the rest of torch's message)")
        if len(calls) == 5:
            raise Killed()
        row = dict(variant=variants[0], size=sizes[0], batch=batches[0], steps=256, cfg=4.0, draw="multinomial",
                   precision="bf16", compile="on", kernels="aten", kv_cache=True, seconds=2.0, cpu_s=2.0)
        return {"results": [row]}

    monkeypatch.setattr(bench_sample, "bench_sample", fake_sample)
    monkeypatch.setattr(bench_train, "bench_train", lambda *a, **k: pytest.fail("no training unit comes this early"))
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: {"matmul_peak": {}, "load_average": []})
    monkeypatch.setattr(bench_gpu, "gpu_tests", lambda timeout, dry, log: {"rc": 0, "summary": "3 passed",
                                                                           "command": "pytest -m gpu", "seconds": 1})
    with pytest.raises(Killed):
        bench_main(["all", "--suite", "gpu", "--device", "cpu", "--variants", "raster,arpg,randar,rar",
                    "--out", str(out)])
    assert calls == [("raster", "L", 1), ("arpg", "L", 1), ("randar", "L", 1), ("raster", "B", 1), ("arpg", "B", 1)]
    assert on_disk[0]["gpu_tests"]["summary"] == "3 passed"  # written before the first unit
    assert [len(d["sample"]["results"]) for d in on_disk[1:]] == [1, 1, 2, 3]  # every finished unit, none lost
    line = "sample L batch 1 arpg: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert on_disk[2]["errors"] == on_disk[-1]["errors"] == [line]  # one line; the traceback goes to stderr
    assert "## Units that failed" in (tmp_path / "gpu.md").read_text()
    err = capsys.readouterr().err
    assert "Traceback" in err and "bench-gpu: sample L batch 1 arpg: FAILED in 10 s" in err
    assert "bench-gpu: sample L batch 1 randar: done in 10 s" in err
