"""The order study's report: per-seed records -> per-arm intervals, overlap marks, Markdown tables, plots, doc block.

Pure functions of the records ``experiments.study`` collects (no model, no training), so the aggregation and the
doc-block replacement are unit-tested on fake rows. A record is one finished run (one arm, one seed):
  arm, seed, run, val_nll, nll {order: bits}, nll_q [q1..q4], fid, class_consistency, inpaint_mse, uncond_mse,
  inpaint_ratio, tokens_seen, default_steps, fid_by_steps {steps: FID},
  by_setting {"<policy>@<steps>": {fid, class_consistency}} (policy "own" = the ordering's own schedule)
Timing (images/s, training seconds) lives in separate records: it is machine-dependent, so it never enters the
bit-for-bit part of the report.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

from experiments.study_stats import Interval, interval, overlap_groups

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
# (title, record key, lower is better or None when the metric is not ranked): the per-arm table, in this order
METRICS = [("val NLL own (bits/token)", "val_nll", True), ("val NLL raster order", "nll_raster", True),
           ("FID", "fid", True), ("class-consistency", "class_consistency", False),
           ("inpaint MSE", "inpaint_mse", True), ("inpaint / unconditional", "inpaint_ratio", True)]
MARKED = ("val_nll", "fid")  # the columns that get an "≈ arms" mark (intervals overlap: not separated)
QUARTERS = 4


# ---------------------------------------------------------------------------------------------------- aggregation
def _arms(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by arm, arms in first-seen order (the sweep's axis order), seeds sorted."""
    groups = defaultdict(list)
    for r in records:
        groups[r["arm"]].append(r)
    return {arm: sorted(rs, key=lambda r: r["seed"]) for arm, rs in groups.items()}


def aggregate(records: list[dict]) -> list[dict]:
    """One summary per arm: an Interval per metric (mean +- 95% CI over seeds), the NLL per order quarter, and for
    val NLL and FID the arms whose intervals overlap this one's (``near_<key>``)."""
    out = []
    for arm, rs in _arms(records).items():
        row = {"arm": arm, "seeds": [r["seed"] for r in rs], "tokens_seen": sorted({r["tokens_seen"] for r in rs})}
        for _, key, _ in METRICS:
            row[key] = interval([r.get(key) for r in rs])
        row["nll_q"] = [interval([r["nll_q"][q] if r.get("nll_q") else None for r in rs]) for q in range(QUARTERS)]
        out.append(row)
    for key in MARKED:
        scored = {row["arm"]: row[key] for row in out if row[key].n}
        groups = overlap_groups(scored, lower_is_better=True)
        for row in out:
            row[f"near_{key}"] = groups.get(row["arm"], [])
    return out


def aggregate_timing(timing: list[dict]) -> dict:
    """{"steps": sorted decode-step counts, "arms": [{arm, images_per_s {steps: Interval}, fit_seconds}]}."""
    steps = sorted({int(s) for t in timing for s in t["images_per_s"]})
    arms = []
    for arm, ts in _arms(timing).items():
        ips = {s: interval([t["images_per_s"].get(str(s), t["images_per_s"].get(s)) for t in ts]) for s in steps}
        arms.append({"arm": arm, "images_per_s": ips, "fit_seconds": interval([t.get("fit_seconds") for t in ts])})
    return {"steps": steps, "arms": arms}


def to_json(obj):
    """Intervals -> {mean, half_width, n}, recursively (study.json)."""
    if isinstance(obj, Interval):
        return {"mean": obj.mean, "half_width": obj.half_width, "n": obj.n}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------- tables
def cell(iv: Interval, digits: int = 3) -> str:
    return "n/a" if not iv.n else iv.text(digits)


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def summary_table(summary: list[dict], fid_title: str = "FID") -> str:
    """Arm | seeds | each metric (mean ± CI) | the ≈ marks after val NLL and FID | tokens seen."""
    head, keys = ["arm", "seeds"], []
    for title, key, _ in METRICS:
        head.append(fid_title if key == "fid" else title)
        keys.append(key)
        if key in MARKED:
            head.append("≈ (overlaps)")
            keys.append(f"near_{key}")
    head.append("tokens seen")
    body = []
    for row in summary:
        cells = [row["arm"], str(len(row["seeds"]))]
        for key in keys:
            cells.append((", ".join(row[key]) or "—") if key.startswith("near_") else cell(row[key], 4 if "nll" in
                                                                                              key else 3))
        cells.append(", ".join(str(t) for t in row["tokens_seen"]))
        body.append(cells)
    return _table(head, body)


def quarter_table(summary: list[dict]) -> str:
    head = ["arm"] + [f"NLL q{q + 1} (bits/token)" for q in range(QUARTERS)]
    return _table(head, [[row["arm"]] + [cell(iv, 4) for iv in row["nll_q"]] for row in summary])


def settings_table(records: list[dict]) -> str:
    """One row per (arm, order policy), one column per decode-step count: "FID / class-consistency" mean ± CI."""
    def steps_of(key):
        return int(key.rpartition("@")[2])

    keys = {k for r in records for k in r.get("by_setting", {})}
    steps = sorted({steps_of(k) for k in keys})
    policies = sorted({k.rpartition("@")[0] for k in keys}, key=lambda p: (p != "own", p))
    body = []
    for arm, rs in _arms(records).items():
        for policy in policies:
            cells = []
            for n in steps:
                vals = [r.get("by_setting", {}).get(f"{policy}@{n}") for r in rs]
                if not any(vals):
                    cells.append("—")
                    continue
                fid = interval([v["fid"] if v else None for v in vals])
                cc = interval([v["class_consistency"] if v else None for v in vals])
                cells.append(f"{cell(fid, 1)} / {cell(cc, 3)}")
            if any(c != "—" for c in cells):
                body.append([arm, policy] + cells)
    return _table(["arm", "order policy"] + [f"FID / class-cons. @ {n} steps" for n in steps], body)


def timing_table(timing: dict) -> str:
    head = ["arm"] + [f"images/s @ {s} steps" for s in timing["steps"]] + ["train s"]
    body = [[t["arm"]] + [cell(t["images_per_s"][s], 1) for s in timing["steps"]] + [cell(t["fit_seconds"], 1)]
            for t in timing["arms"]]
    return _table(head, body)


# ---------------------------------------------------------------------------------------------------- the doc
def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the study markers replaced by ``block`` (markers appended when absent);
    what lies outside the markers (the header, the human-written reading) is kept byte for byte."""
    new = f"{BEGIN}\n{block.strip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: new, text, count=1)
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + new + "\n"


def doc_skeleton(command: str) -> str:
    return (f"# The order study\n\nTwelve orderings and scans on the embedded digits (and three on the digits VQ's "
            f"codes), three seeds each, equal compute; every number is a mean ± 95% confidence interval over seeds "
            f"(experiments/study_stats.py), and arms whose intervals overlap are marked ≈ instead of ranked.\n\n"
            f"Regenerate (resumable: finished runs are collected, not retrained):\n\n    {command}\n\n"
            f"{BEGIN}\n{END}\n\n## Reading\n\n_(written by a human after looking at the numbers above)_\n")


def write_doc(path: str, block: str, command: str) -> str:
    text = open(path).read() if os.path.isfile(path) else doc_skeleton(command)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(replace_block(text, block))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------- plots
def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over seeds of (step, value) curves, at the steps every seed logged."""
    common = set.intersection(*(set(dict(c)) for c in curves)) if curves else set()
    return [(s, sum(dict(c)[s] for c in curves) / len(curves)) for s in sorted(common)]


def plot_nll_curves(curves: dict[str, list[tuple[int, float]]], path: str) -> str:
    from experiments.ablation_collect import _colours, _figure, _save

    colours = _colours(list(curves))
    fig, ax = _figure("validation NLL vs training step (mean over seeds)", "training step", "val NLL (bits/token)")
    for arm, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, color=colours[arm], label=arm)
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: an empty plot, no legend warning
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return path


def plot_quarters(summary: list[dict], path: str) -> str:
    from experiments.ablation_collect import _colours, _figure, _save

    colours = _colours([row["arm"] for row in summary])
    fig, ax = _figure("val NLL by quarter of the generation order", "quarter of the decode order",
                      "val NLL (bits/token)")
    for row in summary:
        qs = [(q + 1, iv.mean, iv.half_width or 0.0) for q, iv in enumerate(row["nll_q"]) if iv.n]
        if qs:
            xs, ys, err = zip(*qs)
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, color=colours[row["arm"]], label=row["arm"])
    ax.set_xticks(range(1, QUARTERS + 1))
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: an empty plot, no legend warning
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return path
