"""The order study (experiments/study.py): per-seed rows aggregate into the right intervals and ≈ marks, the doc
block is replaced without touching the text around it, bad input is one line with exit 2, and the --quick pipeline
runs end to end, then resumes without training and with identical numbers."""
from __future__ import annotations

import json
import math
import os

import pytest

from experiments import study, study_report, train
from experiments.study_report import BEGIN, END


def fake_record(arm, seed, val_nll, fid, **kw):
    return {"arm": arm, "seed": seed, "run": f"{arm}-s{seed}", "val_nll": val_nll, "nll_raster": val_nll + 0.5,
            "nll_q": [val_nll + q for q in range(4)], "fid": fid, "class_consistency": 0.9, "inpaint_mse": 0.1,
            "uncond_mse": 0.2, "inpaint_ratio": 0.5, "tokens_seen": 4096, **kw}


def fake_records():
    # A and C overlap on NLL (same mean, C tighter); B is far from both. FID: all three far apart.
    return ([fake_record("A", s, v, f) for s, v, f in zip((0, 1, 2), (1.0, 1.1, 1.2), (10.0, 11.0, 12.0))]
            + [fake_record("B", s, v, f) for s, v, f in zip((0, 1, 2), (2.0, 2.1, 2.2), (50.0, 51.0, 52.0))]
            + [fake_record("C", s, v, f) for s, v, f in zip((2, 0, 1), (1.15, 1.05, 1.1), (30.0, 31.0, 32.0))])


def test_aggregate_means_intervals_and_overlap_marks():
    summary = {row["arm"]: row for row in study_report.aggregate(fake_records())}
    assert list(summary) == ["A", "B", "C"]  # the sweep's arm order, not a ranking
    a = summary["A"]["val_nll"]
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert a.n == 3 and a.mean == pytest.approx(1.1) and a.half_width == pytest.approx(half)
    assert summary["C"]["seeds"] == [0, 1, 2]
    assert summary["A"]["near_val_nll"] == ["C"] and summary["C"]["near_val_nll"] == ["A"]
    assert summary["B"]["near_val_nll"] == [] and all(not row["near_fid"] for row in summary.values())
    assert summary["A"]["nll_q"][3].mean == pytest.approx(4.1)
    assert summary["A"]["tokens_seen"] == [4096]
    table = study_report.summary_table(list(summary.values()))
    assert f"1.1000 ± {half:.4f}" in table
    b_line = next(line for line in table.splitlines() if line.startswith("| B |"))
    assert "| — |" in b_line  # not overlapping anything: no ≈ mark


def test_one_seed_has_no_interval_and_a_missing_metric_is_na():
    rows = [fake_record("A", 0, 1.0, None), fake_record("B", 0, 1.0, 3.0)]
    summary = study_report.aggregate(rows)
    assert summary[0]["val_nll"].half_width is None and summary[0]["fid"].n == 0
    table = study_report.summary_table(summary)
    assert "(1 seed)" in table and "n/a" in table
    assert json.dumps(study_report.to_json(summary))  # study.json can hold it


def test_settings_table_keeps_policies_apart_and_own_first():
    def setting(fid, cc):
        return {"fid": fid, "class_consistency": cc}

    records = [fake_record("A", s, 1.0, 10.0, by_setting={"own@8": setting(10.0 + s, 0.8), "halton@8": setting(
        20.0 + s, 0.6), "own@16": setting(5.0, 0.9)}) for s in (0, 1)] + [
        fake_record("R", 0, 1.0, 10.0, by_setting={"own@64": setting(7.0, 0.95)})]
    lines = study_report.settings_table(records).splitlines()
    assert lines[0] == "| arm | order policy | FID / class-cons. @ 8 steps | FID / class-cons. @ 16 steps | " \
                       "FID / class-cons. @ 64 steps |"
    a_own, a_halton, r_own = lines[2:]
    assert a_own.startswith("| A | own | 10.5 ± ") and a_own.endswith("| — |")  # own before the policies
    assert a_halton.startswith("| A | halton | 20.5 ± ") and "| — | — |" in a_halton  # halton only at 8 steps
    assert r_own.startswith("| R | own | — | — | 7.0 (1 seed) / 0.950 (1 seed) |")  # no halton row for R


def test_run_record_keeps_the_headline_on_the_own_schedule():
    class FakeArm:
        name, variant, seed = "arpg-s0", "arpg", 0
        metrics = {"val_nll_bits": 2.0, "tokens_seen": 100, "metrics": {}, "fit_seconds": 1.0}

    rows = [{"run": "arpg-s0", "cfg_scale": 4.0, "schedule": sched, "decode_steps": 16, "fid": fid,
             "class_consistency": cc, "images_per_s": 9.0} for sched, fid, cc in (("arccos", 30.0, 0.8),
                                                                                  ("halton", 20.0, 0.9))]
    extra = {"nll": {"raster": 2.1}, "inpaint_mse": 0.1, "uncond_mse": 0.2, "inpaint_ratio": 0.5, "default_steps": 16}
    rec, timing = study.run_record(FakeArm, rows, extra, 4.0, policies=["locality", "halton"])
    assert (rec["fid"], rec["class_consistency"]) == (30.0, 0.8) and rec["fid_by_steps"] == {"16": 30.0}
    assert rec["by_setting"] == {"own@16": {"fid": 30.0, "class_consistency": 0.8},
                                 "halton@16": {"fid": 20.0, "class_consistency": 0.9}}


def test_timing_is_aggregated_apart():
    timing = [{"arm": "A", "seed": s, "fit_seconds": 2.0 + s, "images_per_s": {"64": 10.0 + s}} for s in (0, 1)]
    agg = study_report.aggregate_timing(timing)
    assert agg["steps"] == [64] and agg["arms"][0]["images_per_s"][64].mean == pytest.approx(10.5)
    assert "images/s @ 64 steps" in study_report.timing_table(agg)


def test_doc_block_replacement_keeps_the_text_outside_the_markers(tmp_path):
    text = f"# Title\n\nintro\n\n{BEGIN}\nold numbers\n{END}\n\n## Reading\n\nhuman words\n"
    new = study_report.replace_block(text, "new numbers")
    assert new == f"# Title\n\nintro\n\n{BEGIN}\nnew numbers\n{END}\n\n## Reading\n\nhuman words\n"
    assert study_report.replace_block(new, "new numbers") == new  # idempotent
    assert study_report.replace_block("# Only a title\n", "x").endswith(f"{BEGIN}\nx\n{END}\n")
    doc = str(tmp_path / "docs" / "study.md")
    study_report.write_doc(doc, "first", "make study")
    skeleton = open(doc).read()
    assert "make study" in skeleton and "## Reading" in skeleton and f"{BEGIN}\nfirst\n{END}" in skeleton
    with open(doc, "a") as f:
        f.write("a human's reading\n")
    study_report.write_doc(doc, "second", "make study")
    again = open(doc).read()
    assert "second" in again and "first" not in again and again.endswith("a human's reading\n")


@pytest.mark.parametrize("argv, words", [(["--sweeps", "nope", "--collect-only"], "no sweep 'nope'"),
                                         (["--quick"], "--out")])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as err:
        study.main(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]


def test_a_sweep_on_the_digits_vq_trains_the_vq_first_when_missing(tmp_path, monkeypatch):
    import experiments.demo
    from experiments.ablate import load_sweep

    calls = []
    monkeypatch.setattr(experiments.demo, "ensure_digits_vq", calls.append)
    weights = str(tmp_path / "vq" / "tokenizer.safetensors")
    sweep = load_sweep(study.sweep_path("study_vq"))
    study.ensure_tokenizer(sweep, [f"tokenizer.path={weights}"], log=lambda m: None)
    assert calls == [str(tmp_path / "vq")]
    study.ensure_tokenizer(load_sweep(study.sweep_path("study")), [], log=lambda m: None)  # pixels: nothing to train
    assert len(calls) == 1


@pytest.mark.slow  # 50-80 s on 2 shared cores (6 toy arms trained, then evaluated)
def test_quick_study_end_to_end_then_resumes_without_training(tmp_path, monkeypatch):
    import torch

    from lightning_modules.metrics.extractors import save_digits_extractor, train_digits_extractor

    extractor = str(tmp_path / "digits.safetensors")
    model, info = train_digits_extractor(seed=0, epochs=2)
    save_digits_extractor(model, extractor, info)
    out = str(tmp_path / "q")
    kwargs = dict(quick=True, out=out, extractor=extractor, doc=os.path.join(out, "study.md"),
                  images_dir=os.path.join(out, "images"), json_path=os.path.join(out, "study.json"),
                  log=lambda m: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # debug-size models: extra threads only wait on each other (and on a shared machine)
    try:
        first = study.run_study(["study"], **kwargs)
        again = resumed(kwargs, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    summary = first["sweeps"]["study"]["summary"]
    assert [row["arm"] for row in summary] == ["raster", "randar", "scan-hilbert"]
    for row in summary:  # 2 seeds: a real interval for every deterministic metric
        for key in ("val_nll", "nll_raster", "fid", "class_consistency", "inpaint_ratio"):
            assert row[key]["n"] == 2 and row[key]["half_width"] is not None, (row["arm"], key)
    text = open(first["doc"]).read()
    block = text[text.index(BEGIN):text.index(END)]
    assert "inpaint / unconditional" in block and "eval: hilbert" in block and "Machine-dependent" in block
    assert "## Reading" in text[text.index(END):]
    assert json.load(open(first["json"]))["sweeps"] == first["sweeps"]
    for name in ("nll_vs_step", "fid_vs_steps", "nll_quarters", "cross_order", "randar_samples"):
        assert os.path.isfile(os.path.join(out, "images", f"study_{name}.png")), name

    assert again["sweeps"] == first["sweeps"]  # timings aside, bit for bit


def resumed(kwargs, monkeypatch) -> dict:
    """The same study again, with training forbidden: every arm must be collected."""
    def no_training(*args, **kw):
        raise AssertionError("a finished arm was retrained")

    monkeypatch.setattr(train, "run", no_training)
    return study.run_study(["study"], **kwargs)
