"""What a refactor of the orderings must not change: per-ordering debug loss curves and fixed-seed sampled codes.

    python tests/frozen_behaviour.py --write     # record tests/assets/frozen/orderings.json (before a refactor)
    pytest tests/test_frozen_behaviour.py        # compare bit for bit (after it)

Each arm is a debug preset trained through the same path the CLI takes (load_config -> build -> Trainer.fit), on
one thread with deterministic kernels, for ``STEPS`` steps; the loss of every step is recorded as a float hex
string, so equality is bit-exact. Then fixed-seed codes are sampled in official and consistent mode, with CFG,
and with the locality order where the ordering supports it. The record carries the kernel set it was taken on
(tests/kernel_set.py): bit-exact there, within rounding on another CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN = os.path.join(REPO, "tests", "assets", "frozen", "orderings.json")
STEPS = 6
# (arm name, overrides over experiments/configs/debug_raster.yaml)
ARMS = [
    ("raster", ["model.variant=raster"]),
    ("rar", ["model.variant=rar"]),
    ("randar", ["model.variant=randar"]),
    ("arpg", ["model.variant=arpg"]),
    ("raster_rar_vit", ["model.variant=raster", "model.flavour=rar_vit"]),
    ("rar_rar_vit", ["model.variant=rar", "model.flavour=rar_vit"]),
]
SAMPLINGS = {  # name -> sample overrides (a name the ordering cannot run is skipped when it raises ValueError)
    "default": {},
    "cfg2": {"cfg_scale": 2.0},
    "consistent_cfg2": {"cfg_scale": 2.0, "mode": "consistent"},
    "locality": {"schedule": "locality"},
    "steps3": {"num_steps": 3},
}


def arm_run(name: str, overrides: list[str], out_dir: str) -> dict:
    import lightning as L

    from experiments.build import build_datamodule, build_lightning_module, build_trainer
    from experiments.config import batch_layout, load_config

    cfg = load_config([os.path.join(REPO, "experiments", "configs", "debug_raster.yaml")],
                      [*overrides, f"trainer.max_steps={STEPS}", "trainer.val_every_steps=1000",
                       "trainer.ckpt_every_steps=1000", "callbacks.sample_every_steps=0", f"out_dir={out_dir}",
                       f"data.root={out_dir}/digits", f"name={name}", "resume=never", "trainer.deterministic=true"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    _, micro, _ = batch_layout(cfg)
    dm, grid = build_datamodule(cfg, micro)
    module = build_lightning_module(cfg, grid)
    losses: list[str] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]).hex())

    trainer = build_trainer(cfg, os.path.join(out_dir, name), [Record()], enable_progress_bar=False, logger=False,
                            enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    labels = torch.arange(4) % 10
    module.eval()
    codes = {}
    for sname, kw in SAMPLINGS.items():
        try:
            codes[sname] = module.sample_codes(labels, seed=3, **kw).flatten().tolist()
        except ValueError:
            continue
    weights = sum(float(p.detach().double().sum()) for p in module.backbone.parameters())
    trainer.validate(module, datamodule=dm, verbose=False)  # val NLL: the end-of-schedule orders, fixed generators
    val = trainer.callback_metrics["val/nll"]
    return {"losses": losses, "codes": codes, "weight_sum": float(weights).hex(), "val_loss": float(val).hex()}


def compute(out_dir: str) -> dict:
    torch.set_num_threads(1)
    return {name: arm_run(name, overrides, out_dir) for name, overrides in ARMS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"record {os.path.relpath(FROZEN, REPO)}")
    p.add_argument("--out-dir", default=os.path.join(REPO, ".cache", "frozen_runs"))
    a = p.parse_args(argv)
    result = compute(a.out_dir)
    if a.write:
        os.makedirs(os.path.dirname(FROZEN), exist_ok=True)
        from kernel_set import kernel_set

        with open(FROZEN, "w") as f:
            json.dump({"kernel_set": kernel_set(), "arms": result}, f, indent=1, sort_keys=True)
        print(f"wrote {FROZEN}")
    else:
        print(json.dumps({k: v["losses"] for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
