"""Export a training checkpoint to a folder that samples WITHOUT DeepSpeed (or Lightning's checkpoint machinery).

    python -m experiments.export --ckpt runs/<name>/checkpoints/last.ckpt --out exports/<name>
    python -m experiments.export --ckpt runs/<name>/checkpoints/step0005000.ckpt --out exports/<name> --no-ema

--ckpt is one of our Lightning .ckpt files, or a DeepSpeed ZeRO-2/3 checkpoint DIRECTORY (what Lightning's
ModelCheckpoint writes under DeepSpeed, also named *.ckpt), which is gathered into one fp32 state dict first.
Writes:
    OUT/model.safetensors   fp32 backbone state dict (our names, as experiments.import_official writes them); the
                            EMA weights when the checkpoint holds EMA callback state (--no-ema: the live weights)
    OUT/roar.json           the import-folder format of experiments.checkpoints: "model", "tokenizer" ({"build",
                            "fingerprint"}), "sample", "vocab_size", "weights": "model.safetensors"; plus "ema",
                            "global_step", "source" and "config" (the run's resolved config.yaml)
Read it back with experiments.checkpoints.load_generator(OUT), or python -m experiments.sample --ckpt OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


from lightning_modules.checkpointing import safe_load

FORMAT = "roar-export/1"


# ----------------------------------------------------------------------------- reading checkpoints
def is_zero_checkpoint(path: str) -> bool:
    """A DeepSpeed checkpoint directory (Lightning's DeepSpeed ModelCheckpoint writes one per .ckpt name)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "latest"))
                                    or os.path.isdir(os.path.join(path, "checkpoint")))


def load_training_checkpoint(path: str) -> dict:
    """The Lightning checkpoint dict of ``path``; ZeRO directories are gathered to fp32 through a temp file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--ckpt: not found: {path}")
    if os.path.isdir(path):
        if not is_zero_checkpoint(path):
            raise ValueError(f"--ckpt: {path} is a directory but not a DeepSpeed checkpoint (no 'latest' inside)")
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "gathered.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(path, out)  # keeps Lightning's client state (callbacks...)
            return safe_load(out)
    return safe_load(path)


def ema_shadow(checkpoint: dict) -> dict | None:
    """The EMA callback's fp32 shadow {backbone param name: tensor}, if the run had one (callbacks/ema.py)."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get("shadow"), dict) and state["shadow"]:
            return state["shadow"]
    return None


def run_config(ckpt_path: str) -> dict | None:
    """The run's resolved config.yaml: runs/<name>/config.yaml beside checkpoints/ (or beside the checkpoint)."""
    from omegaconf import OmegaConf

    folder = os.path.dirname(os.path.abspath(ckpt_path.rstrip("/")))
    for candidate in (os.path.join(folder, "config.yaml"), os.path.join(os.path.dirname(folder), "config.yaml")):
        if os.path.isfile(candidate):
            return OmegaConf.to_container(OmegaConf.load(candidate), resolve=True)
    return None


# ----------------------------------------------------------------------------- export
def export(ckpt_path: str, out_dir: str, use_ema: bool = True, verify: bool = True) -> dict:
    """Write OUT/model.safetensors + OUT/roar.json; returns the roar.json dict."""
    from lightning_modules.official.checkpoint_io import save_state_dict_file

    checkpoint = load_training_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [k for k in ("model", "tokenizer") if k not in hparams]
    if "state_dict" not in checkpoint or missing:
        raise ValueError(f"--ckpt: {ckpt_path} is not a roar generator checkpoint (no state_dict / hyper_parameters "
                         f"{missing})")
    # the backbone in its own names, as experiments.import_official writes it (the module holds nothing else)
    state = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    shadow = ema_shadow(checkpoint) if use_ema else None
    if shadow is not None:
        unknown = sorted(set(shadow) - set(state))
        if unknown:
            raise ValueError(f"--ckpt: EMA holds {unknown[0]!r}, which the model state dict does not have")
        state.update(shadow)
    # fp32 for every float tensor (bf16 runs, fp32 EMA alike)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    meta = checkpoint.get("roar") or {}
    model = hparams["model"]
    info = {
        # what experiments.checkpoints.load_generator reads from an import folder ...
        "format": FORMAT, "family": "roar", "variant": model.get("variant"), "model": model,
        "tokenizer": {**hparams["tokenizer"], "fingerprint": meta.get("tokenizer_fingerprint")},
        "sample": hparams.get("sample") or {}, "vocab_size": meta.get("vocab_size"),
        "weights": "model.safetensors",
        # ... and where the weights came from
        "ema": shadow is not None, "global_step": int(checkpoint.get("global_step", 0)),
        "seed": hparams.get("seed", 0), "max_steps": hparams.get("max_steps"), "optim": hparams.get("optim"),
        "source": os.path.abspath(ckpt_path), "config": run_config(ckpt_path),
    }
    os.makedirs(out_dir, exist_ok=True)
    save_state_dict_file(os.path.join(out_dir, "model.safetensors"), state,
                         {"roar.json": json.dumps(info, sort_keys=True)})
    with open(os.path.join(out_dir, "roar.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    if verify:  # read it back the way samplers do: rebuilt from roar.json alone, loaded strictly
        from experiments.checkpoints import load_generator

        load_generator(out_dir)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a Lightning .ckpt file or a DeepSpeed checkpoint directory")
    p.add_argument("--out", required=True, help="folder to write model.safetensors + roar.json into")
    p.add_argument("--no-ema", action="store_true", help="export the live weights even when EMA state exists")
    p.add_argument("--no-verify", action="store_true", help="skip rebuilding the module to check the export")
    a = p.parse_args(argv)
    try:
        info = export(a.ckpt, a.out, use_ema=not a.no_ema, verify=not a.no_verify)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError and strict-load errors are ValueErrors
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"roar: exported {'EMA' if info['ema'] else 'live'} weights of step {info['global_step']} to {a.out}/ "
          f"(model.safetensors, roar.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
