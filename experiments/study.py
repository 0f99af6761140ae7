"""`make study`: the order study — every ordering and scan, several seeds, equal compute, one report.

    python -m experiments.study                          # both sweeps (study, study_vq), then docs/study.md
    python -m experiments.study --collect-only           # never train; report the finished runs
    python -m experiments.study --quick --out /tmp/q     # the whole pipeline in about a minute (tests)

Runs the sweeps experiments/configs/sweeps/{study,study_vq}.yaml through ``experiments.ablate.run_sweep`` (which
trains missing arms, skips finished ones by config hash, and caches FID / class-consistency / images/s per decode
setting). Then, per finished run, the study's own metrics, cached in ``<run>/study_eval.json`` under a key of the
run's config hash, steps and this protocol (so a rerun recomputes nothing):
  * val NLL in each order of CROSS_ORDERS (own, raster, random, spiral_in, hilbert) on every val batch;
  * inpainting: the first 100 val images, the ``center`` region regenerated under the true label at the run's
    default sampling settings, region MSE (pixels in [0, 1]) against the tokenizer's reconstruction of the truth
    (so the tokenizer's own error is not counted); the same MSE of class-conditional samples from scratch of the
    same labels is the baseline, and their ratio says how much the ordering uses the kept context (lower = more);
  * a 40-image sample grid (classes in columns).
Aggregates per arm over seeds (experiments/study_report.py: mean ± 95% CI, ≈ marks where intervals overlap), writes
plots into docs/images/study/, the block between the study markers of docs/study.md, and runs/study/study.json.
Timings (images/s, training seconds) are machine-dependent and kept in their own section and JSON key.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from experiments import study_report as report
from experiments.ablate import REPO, finished_metrics, load_sweep, training_arms
from experiments.cli import fail
from experiments.config import ConfigError, config_hash
from experiments.signals import ends_in_one_line

SWEEP_DIR = os.path.join(REPO, "experiments", "configs", "sweeps")
CROSS_ORDERS = ["own", "raster", "random", "spiral_in", "hilbert"]
STUDY_CACHE = "study_eval.json"
PROTOCOL = dict(orders=CROSS_ORDERS, val_batch=64, inpaint_images=100, region="center", seed=0, grid_images=40)
SALT_INPAINT, SALT_SCRATCH, SALT_GRID = 101, 102, 103  # derive_seed salts: independent streams per use
# --quick: the pipeline end to end on toy runs (a smoke test, not a result); the size is a sweep axis (an arm
# override of model.size would be overridden by the axis)
QUICK_SWEEP = ["axes.sizes=[debug]", "axes.seeds=[0,1]", "axes.variants=[raster,randar,scan@hilbert]",
               "axes.decode_steps=[0,8]", "eval.fid_samples=20", "eval.batch_size=20"]
QUICK_TRAIN = ["trainer.max_steps=4", "trainer.val_every_steps=2", "trainer.ckpt_every_steps=4",
               "trainer.limit_val_batches=1", "callbacks.sample_every_steps=0", "trainer.global_batch_size=16"]
QUICK_PROTOCOL = dict(inpaint_images=8, val_batch=16)


# ---------------------------------------------------------------------------------------------------- per run
def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"  # atomic: an interrupted study never leaves half a cache
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@torch.no_grad()
def inpaint_scores(module, batches, protocol: dict) -> dict:
    """Region MSE of inpainting vs sampling from scratch, on the first ``inpaint_images`` val images."""
    from experiments.edit import pixels
    from lightning_modules.base import derive_seed, make_generator
    from lightning_modules.editing import inpaint, region_mask

    codes, labels, dev, n = [], [], module.device, protocol["inpaint_images"]
    for _, batch in batches:
        on_device = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}  # ids etc. stay as is
        codes.append(module.codes_from_batch(on_device))  # [B, N]
        labels.append(batch["label"].to(dev))
    grid, tok = tuple(module.grid), module.tokenizer
    codes, labels = torch.cat(codes)[:n].view(-1, *grid), torch.cat(labels)[:n]  # [n, h, w], [n]
    region = region_mask(protocol["region"], grid)  # bool [h, w]
    truth = tok.decode(codes).float() / 255  # [n, 3, H, W]
    gen = make_generator(derive_seed(protocol["seed"], SALT_INPAINT), dev)
    filled = tok.decode(inpaint(module, codes, region, labels, None, gen)).float() / 255
    scratch = module.sample_images(labels, derive_seed(protocol["seed"], SALT_SCRATCH)).float() / 255
    px = pixels(region, tuple(truth.shape[2:])).to(truth.device)  # bool [H, W]

    def mse(images):
        return float(((images.to(truth.device) - truth) ** 2)[..., px].mean())

    inp, unc = mse(filled), mse(scratch)
    return {"inpaint_mse": inp, "uncond_mse": unc, "inpaint_ratio": inp / unc if unc > 0 else None}


def sample_grid(module, protocol: dict, path: str) -> str:
    """``grid_images`` class-conditional samples, label = index % classes, so classes run along the columns."""
    from lightning_modules.base import derive_seed
    from lightning_modules.callbacks.images import image_grid, save_png, upscale_for_display

    classes = module.backbone.num_classes
    labels = torch.arange(protocol["grid_images"], device=module.device) % classes
    images = module.sample_images(labels, derive_seed(protocol["seed"], SALT_GRID)).cpu()
    return save_png(image_grid(images, nrow=classes, scale=upscale_for_display(images)), path)


def study_eval(arm, protocol: dict, device: str = "", log=print) -> dict:
    """The study's metrics of one finished run, from ``<run>/study_eval.json`` when this protocol was run."""
    from experiments.ablate import load_module
    from experiments.cross_order import order_nll, val_batches

    path = os.path.join(arm.run_dir, STUDY_CACHE)
    cache = json.load(open(path)) if os.path.isfile(path) else {}
    key = json.dumps(dict(hash=config_hash(arm.cfg), steps=arm.metrics["steps"], **protocol), sort_keys=True)
    if key in cache:
        return cache[key]
    module = load_module(arm, device)
    batches = list(val_batches(arm.run_dir, 0, protocol["val_batch"]))  # every val batch
    entry = {"nll": order_nll(module, batches, list(protocol["orders"]), protocol["seed"]),
             "default_steps": module.sample_settings().num_steps, **inpaint_scores(module, batches, protocol),
             "grid": sample_grid(module, protocol, os.path.join(arm.run_dir, "study_samples.png"))}
    log(f"study: {arm.name}: " + " ".join(f"nll[{o}]={v:.4f}" for o, v in entry["nll"].items())
        + f" inpaint/uncond={entry['inpaint_ratio']}")
    cache[key] = entry
    _write_json(path, cache)
    return entry


def run_record(arm, rows: list[dict], extra: dict, cfg_scale: float, policies=()) -> tuple[dict, dict]:
    """(deterministic record, timing record) of one run from its ablation rows and its study_eval entry.

    ``policies``: the sweep's non-default ``axes.schedules`` (e.g. locality, halton); rows decoded with one of them
    go to ``by_setting`` only, so the headline FID / class-consistency stay those of the ordering's own schedule."""
    mine = [r for r in rows if r["run"] == arm.name and r["cfg_scale"] == cfg_scale]
    own = [r for r in mine if r["schedule"] not in policies]
    default = next((r for r in own if r["decode_steps"] == extra["default_steps"]), {})
    m = arm.metrics
    by_setting = {f"{r['schedule'] if r['schedule'] in policies else 'own'}@{r['decode_steps']}":
                  {"fid": r["fid"], "class_consistency": r["class_consistency"]} for r in mine}
    record = {"arm": arm.variant, "seed": arm.seed, "run": arm.name, "val_nll": m["val_nll_bits"],
              "nll": extra["nll"], "nll_raster": extra["nll"].get("raster"),
              "nll_q": [m["metrics"].get(f"val/nll_by_order_q{q + 1}") for q in range(report.QUARTERS)],
              "fid": default.get("fid"), "class_consistency": default.get("class_consistency"),
              "inpaint_mse": extra["inpaint_mse"], "uncond_mse": extra["uncond_mse"],
              "inpaint_ratio": extra["inpaint_ratio"], "tokens_seen": m["tokens_seen"],
              "default_steps": extra["default_steps"], "fid_by_steps": {str(r["decode_steps"]): r["fid"] for r in own},
              "by_setting": by_setting}
    timing = {"arm": arm.variant, "seed": arm.seed, "fit_seconds": m.get("fit_seconds"),
              "images_per_s": {str(r["decode_steps"]): r["images_per_s"] for r in own}}
    return record, timing


# ---------------------------------------------------------------------------------------------------- per sweep
def sweep_path(name: str) -> str:
    path = os.path.join(SWEEP_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(SWEEP_DIR) if f.endswith(".yaml"))
        raise ConfigError("--sweeps", f"no sweep {name!r} in {os.path.relpath(SWEEP_DIR)} ({', '.join(names)})")
    return path


def ensure_tokenizer(sweep, extra: list[str], log=print) -> None:
    """Train the digits VQ when a sweep trains on its codes and the weights are missing (experiments.demo)."""
    from experiments.config import load_config

    tok = load_config([sweep.base], [*sweep.overrides, *extra]).tokenizer
    if tok.kind == "digits_vq" and tok.path and not os.path.isfile(tok.path):
        from experiments.demo import ensure_digits_vq

        log(f"study: {sweep.name} trains on the digits VQ's codes; training it first")
        ensure_digits_vq(os.path.dirname(tok.path))


def run_one_sweep(name: str, overrides: list[str], extra: list[str], protocol: dict, collect_only: bool,
                  device: str, log=print) -> dict:
    """run_sweep, then the study metrics of every finished run -> records, timing and the ablation rows."""
    from experiments.ablate import run_sweep

    path = sweep_path(name)
    sweep = load_sweep(path, overrides)
    ensure_tokenizer(sweep, extra, log)
    out = run_sweep(path, collect_only=collect_only, overrides=overrides, extra=extra, log=log)
    arms = training_arms(sweep, extra)
    for arm in arms:
        arm.metrics = finished_metrics(arm)
    done = [a for a in arms if a.metrics is not None]
    records, timing = [], []
    for arm in done:
        rec, tim = run_record(arm, out["rows"], study_eval(arm, protocol, device, log), float(sweep.axes.cfg_scales[0]),
                              policies=[str(s) for s in sweep.axes.schedules if s])
        records.append(rec)
        timing.append(tim)
    return {"sweep": sweep, "arms": done, "rows": out["rows"], "records": records, "timing": timing,
            "missing": out["missing"], "ablation": out["markdown"]}


def sweep_pictures(res: dict, images_dir: str) -> dict:
    """The sweep's plots and seed-0 sample grids into ``images_dir`` -> {name: path}."""
    from experiments.ablation_collect import plot_vs_steps, read_scalars
    from experiments.cross_order import heatmap

    name, pics = res["sweep"].name, {}
    os.makedirs(images_dir, exist_ok=True)
    summary, seed0 = res["summary"], [r for r in res["records"] if r["seed"] == min(res["sweep"].axes.seeds)]
    curves = {}
    for arm in res["arms"]:
        curves.setdefault(arm.variant, []).append(read_scalars(os.path.join(arm.run_dir, "tb"), "val/nll"))
    pics["nll_vs_step"] = report.plot_nll_curves({a: report.mean_curve(c) for a, c in curves.items()},
                                                 os.path.join(images_dir, f"{name}_nll_vs_step.png"))
    pics["nll_quarters"] = report.plot_quarters(summary, os.path.join(images_dir, f"{name}_nll_quarters.png"))
    if any(r["fid"] is not None for r in res["rows"]):
        pics["fid_vs_steps"] = os.path.join(images_dir, f"{name}_fid_vs_steps.png")
        plot_vs_steps(res["rows"], "fid", "FID", pics["fid_vs_steps"])
    if res["rows"]:
        pics["speed_vs_steps"] = os.path.join(images_dir, f"{name}_speed_vs_steps.png")
        plot_vs_steps(res["rows"], "images_per_s", "images/s", pics["speed_vs_steps"])
    if seed0:
        pics["cross_order"] = heatmap(res["cross_order"], CROSS_ORDERS, os.path.join(images_dir,
                                                                                   f"{name}_cross_order.png"))
    for arm in res["arms"]:
        grid = os.path.join(arm.run_dir, "study_samples.png")
        if arm.seed == min(res["sweep"].axes.seeds) and os.path.isfile(grid):
            pics[f"samples:{arm.variant}"] = shutil.copyfile(grid, os.path.join(images_dir,
                                                                                f"{name}_{arm.variant}_samples.png"))
    return pics


def sweep_section(res: dict, pics: dict, doc_dir: str) -> str:
    """The deterministic Markdown of one sweep (tables and pictures; no timings)."""
    from experiments.cross_order import markdown

    def img(key, alt):
        return f"![{alt}]({os.path.relpath(pics[key], doc_dir)})" if key in pics else ""

    sweep, n_runs = res["sweep"], len(res["records"])
    parts = [f"## Sweep `{sweep.name}` ({n_runs} runs, seeds {list(sweep.axes.seeds)}, "
             f"{res['records'][0]['tokens_seen'] if n_runs else 0} tokens each)", "",
             "Per arm, mean ± 95% CI over seeds; FID and class-consistency at the arm's default decode steps, CFG "
             f"{float(sweep.axes.cfg_scales[0]):g} ({sweep.eval.fid_samples} samples); inpaint / unconditional < 1: "
             "the ordering uses the kept context. ≈: arms whose interval overlaps (not separated by these seeds).",
             "", report.summary_table(res["summary"]), "",
             "### FID and class-consistency by decode steps and order policy", "",
             "`own`: the ordering's own schedule (the headline rows above); `locality` / `halton`: the same model "
             "decoding its positions in that order (lightning_modules/order_policies.py). Mean ± 95% CI over seeds.",
             "", report.settings_table(res["records"]), "", "### NLL by quarter of the generation order", "",
             report.quarter_table(res["summary"]), "", img("nll_quarters", "NLL by order quarter"), ""]
    if res["cross_order"]:
        parts += ["### Cross-order NLL (seed 0; rows: train order, columns: eval order)", "",
                  markdown(res["cross_order"], CROSS_ORDERS),
                  "", img("cross_order", "cross-order NLL"), ""]
    parts += ["### Curves", "", img("nll_vs_step", "val NLL vs step"), img("fid_vs_steps", "FID vs decode steps"), "",
              "### Samples (seed 0; one class per column)", ""]
    parts += [f"**{arm}**\n\n{img(key, arm)}\n" for key in pics if key.startswith("samples:")
              for arm in [key.split(":", 1)[1]]]
    if res["missing"]:
        parts += [f"Not finished: {', '.join(res['missing'])}", ""]
    return "\n".join(parts)


def timing_section(res: dict, pics: dict, doc_dir: str) -> str:
    rel = f"\n\n![images/s]({os.path.relpath(pics['speed_vs_steps'], doc_dir)})" if "speed_vs_steps" in pics else ""
    return (f"### `{res['sweep'].name}`\n\n" + report.timing_table(report.aggregate_timing(res["timing"])) + rel)


# ---------------------------------------------------------------------------------------------------- the study
def run_study(sweeps: list[str], collect_only: bool = False, doc: str = "docs/study.md",
              images_dir: str = "docs/images/study", json_path: str = "runs/study/study.json", quick: bool = False,
              out: str = "", extractor: str = "", device: str = "", log=print) -> dict:
    """Every sweep, its study metrics, the doc block and study.json -> {"sweeps": deterministic, "timing": ...}."""
    protocol = dict(PROTOCOL, **(QUICK_PROTOCOL if quick else {}))
    results, timing, sections, timings = {}, {}, [], []
    doc_dir = os.path.dirname(os.path.abspath(doc))
    for name in sweeps:
        if quick and not extractor:  # keep the smoke run's files out of the repo's runs/
            extractor = os.path.join(out, "digits_extractor.safetensors")
        overrides = [f"eval.extractor_weights={extractor}"] if extractor else []
        extra = []
        if quick:
            overrides += [*QUICK_SWEEP, f"out_dir={os.path.join(out, name)}"]
            extra = [*QUICK_TRAIN, f"data.root={os.path.join(out, 'digits')}"]
        res = run_one_sweep(name, overrides, extra, protocol, collect_only, device, log)
        res["summary"] = report.aggregate(res["records"])
        seed0 = [r for r in res["records"] if r["seed"] == min(res["sweep"].axes.seeds)]
        res["cross_order"] = [{"label": r["arm"], "nll": r["nll"]} for r in seed0]
        pics = sweep_pictures(res, images_dir)
        sections.append(sweep_section(res, pics, doc_dir))
        timings.append(timing_section(res, pics, doc_dir))
        results[name] = {"records": res["records"], "summary": report.to_json(res["summary"]),
                         "cross_order": res["cross_order"], "missing": res["missing"]}
        timing[name] = {"records": res["timing"], "summary": report.to_json(report.aggregate_timing(res["timing"]))}
    block = "\n".join(sections + ["## Machine-dependent: timings", "",
                                  "Images/s and training seconds depend on the machine and its load: never compare "
                                  "them across machines, and they are not part of the reproducible numbers above.",
                                  "", *timings])
    command = "make study" if not quick else f"python -m experiments.study --quick --out {out}"
    report.write_doc(doc, block, command)
    study = {"protocol": protocol, "sweeps": results, "timing": timing}
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    _write_json(json_path, study)
    log(f"study: {doc} (block between the study markers), {json_path}, pictures in {images_dir}/")
    return dict(study, doc=doc, json=json_path, images_dir=images_dir)


@ends_in_one_line  # Ctrl-C / SIGTERM while an arm trains: one line, 130 / 143 (experiments/signals.py)
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweeps", default=None, help="comma-separated sweep names (default study,study_vq; "
                                                  "--quick: study)")
    p.add_argument("--collect-only", action="store_true", help="never train; report the finished runs")
    p.add_argument("--doc", default=None, help="the Markdown doc (default docs/study.md; --quick: OUT/study.md)")
    p.add_argument("--quick", action="store_true", help="smoke mode: debug model, 4 steps, 2 seeds, 3 arms")
    p.add_argument("--out", default="", help="--quick: the folder of every output (runs, doc, pictures, json)")
    p.add_argument("--extractor", default="", help="digits FID extractor weights (default the sweep's)")
    p.add_argument("--device", default="", help="evaluation device ('' = cuda when available)")
    a = p.parse_args(argv)
    if a.quick and not a.out:
        fail("--quick: give --out DIR (the smoke study writes everything there)")
    sweeps = [s for s in (a.sweeps or ("study" if a.quick else "study,study_vq")).split(",") if s]
    paths = (dict(doc=a.doc or os.path.join(a.out, "study.md"), images_dir=os.path.join(a.out, "images"),
                  json_path=os.path.join(a.out, "study.json")) if a.quick else dict(doc=a.doc or "docs/study.md"))
    try:
        out = run_study(sweeps, a.collect_only, quick=a.quick, out=a.out, extractor=a.extractor, device=a.device,
                        log=lambda m: print(m, flush=True), **paths)
    except (ConfigError, RuntimeError, FileNotFoundError, ValueError) as err:
        fail(str(err).splitlines()[0])
    print(f"study: done; {out['doc']} and {out['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
