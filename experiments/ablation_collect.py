"""Collect an ablation sweep's rows into a Markdown table, a CSV, a JSON file, PNG plots and TensorBoard images.

Called by ``experiments.ablate`` (also with ``--collect-only``). Plots (matplotlib, Agg canvas, no pyplot state):
  val_nll.png    val NLL (bits/token) vs training step, one line per training arm, read from its TensorBoard events
  fid.png        FID vs decode steps, one line per (variant, size, schedule, CFG), mean over seeds
  speed.png      images/s vs decode steps, same lines
The same pictures go to TensorBoard under ``<out_dir>/ablation/`` (tags ``ablation/*``) with the table as text.
"""
from __future__ import annotations

import csv
import glob
import json
import os
from collections import defaultdict

import numpy as np

COLUMNS = [  # (title, key, format)
    ("variant", "variant", "{}"), ("size", "size", "{}"), ("seed", "seed", "{}"), ("schedule", "schedule", "{}"),
    ("decode steps", "decode_steps", "{}"), ("CFG", "cfg_scale", "{:g}"), ("train steps", "train_steps", "{}"),
    ("tokens seen", "tokens_seen", "{}"), ("val NLL (bits/token)", "val_nll", "{:.4f}"), ("FID", "fid", "{:.3f}"),
    ("class-consistency", "class_consistency", "{:.3f}"), ("images/s", "images_per_s", "{:.1f}"),
    ("params (M)", "params_M", "{:.2f}"), ("run", "run", "{}"),
]
GROUP = ("variant", "size", "schedule", "cfg_scale")  # one plotted line / one mean row per group and decode steps


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return spec.format(value)


def markdown_table(rows: list[dict], columns=COLUMNS, fid_title: str = "FID") -> str:
    titles = [fid_title if key == "fid" else title for title, key, _ in columns]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key), spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


def mean_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per (group, decode steps): mean (and std) of val NLL, FID and images/s over seeds."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in GROUP) + (row["decode_steps"],)].append(row)
    out = []
    for members in groups.values():
        row = {k: members[0][k] for k in (*GROUP, "decode_steps", "train_steps", "tokens_seen", "params_M")}
        row["seeds"] = len(members)
        for key in ("val_nll", "fid", "class_consistency", "images_per_s"):
            values = [m.get(key) for m in members if m.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            row[key + "_std"] = float(np.std(values)) if len(values) > 1 else 0.0
        out.append(row)
    return out


def read_scalars(tb_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of ``tag`` from every TensorBoard event file under ``tb_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for events in sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars(tag)})  # a resumed run repeats steps: last wins
    return sorted(points.items())


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: str) -> np.ndarray:
    """Write the PNG and return the picture uint8 [3, H, W] (for TensorBoard)."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.savefig(path)
    return rgb.transpose(2, 0, 1)


def _colours(variants: list[str]) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def plot_nll(arms, path: str) -> np.ndarray:
    colours = _colours(list(dict.fromkeys(a.variant for a in arms)))
    fig, ax = _figure("validation NLL vs training step", "training step", "val NLL (bits/token)")
    for arm in arms:
        points = read_scalars(os.path.join(arm.run_dir, "tb"), "val/nll")
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", ms=3, color=colours[arm.variant], label=arm.name)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_vs_steps(rows: list[dict], key: str, ylabel: str, path: str) -> np.ndarray:
    colours = _colours(list(dict.fromkeys(r["variant"] for r in rows)))
    fig, ax = _figure(f"{ylabel} vs decode steps", "decode steps", ylabel)
    lines = defaultdict(list)
    for row in mean_over_seeds(rows):
        if row[key] is not None:
            lines[tuple(row[k] for k in GROUP)].append((row["decode_steps"], row[key]))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]  # colour = variant, style = (order, CFG)

    def kind(schedule, cfg):  # each ordering names its default count schedule differently: "default" for all
        return ("default" if schedule != "locality" else "locality", cfg)

    kinds = sorted({kind(g[2], g[3]) for g in lines})
    for group, points in lines.items():
        xs, ys = zip(*sorted(points))
        variant, size, schedule, cfg = group
        line, marker = styles[kinds.index(kind(schedule, cfg)) % len(styles)]
        ax.plot(xs, ys, marker=marker, color=colours[variant], linestyle=line,
                label=f"{variant} {size} {schedule} cfg{cfg:g}")
    ax.set_xscale("log", base=2)
    ticks = sorted({x for points in lines.values() for x, _ in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])  # decode-step counts as plain numbers
    ax.minorticks_off()
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_outputs(sweep, arms, rows: list[dict], log=print) -> dict:
    """Tables (md / csv / json), plots (png) and TensorBoard images for a sweep; returns the paths and table."""
    out = sweep.out_dir
    plots_dir, tb_dir = os.path.join(out, "plots"), os.path.join(out, "ablation")
    os.makedirs(plots_dir, exist_ok=True)
    fid_title = next((f"FID ({r['fid_tag'][3:]}, {sweep.eval.extractor})" for r in rows if r.get("fid_tag")), "FID")
    table = markdown_table(rows, fid_title=fid_title)
    parts = [f"# Ablation {sweep.name}", "", table]
    if len(sweep.axes.seeds) > 1:
        cols = [c for c in COLUMNS if c[1] not in ("seed", "run")] + [("seeds", "seeds", "{}")]
        parts += ["", "Mean over seeds:", "", markdown_table(mean_over_seeds(rows), cols, fid_title)]
    missing = [a.name for a in arms if a.metrics is None]
    if missing:
        parts += ["", "Not finished (train them, then collect again): " + ", ".join(missing)]
    paths = {"markdown": os.path.join(out, "ablation.md"), "csv": os.path.join(out, "ablation.csv"),
             "json": os.path.join(out, "ablation.json"), "plots_dir": plots_dir, "tb_dir": tb_dir}
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(parts) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for _, key, _ in COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["json"], "w") as f:
        json.dump({"sweep": sweep.name, "rows": rows, "missing": missing}, f, indent=1)
    pictures = {}
    done = [a for a in arms if a.metrics is not None]
    if done:
        pictures["val_nll"] = plot_nll(done, os.path.join(plots_dir, "val_nll.png"))
    if any(r["fid"] is not None for r in rows):
        pictures["fid_vs_steps"] = plot_vs_steps(rows, "fid", fid_title, os.path.join(plots_dir, "fid.png"))
    if rows:
        pictures["speed_vs_steps"] = plot_vs_steps(rows, "images_per_s", "images/s",
                                                   os.path.join(plots_dir, "speed.png"))
    from torch.utils.tensorboard import SummaryWriter

    for stale in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):  # one collection = one event file
        os.remove(stale)
    with SummaryWriter(tb_dir) as writer:
        for tag, picture in pictures.items():
            writer.add_image(f"ablation/{tag}", picture, global_step=0)
        writer.add_text("ablation/table", table, global_step=0)
    log("\n" + table + "\n")
    return dict(paths, table=table, rows=rows, missing=missing)
