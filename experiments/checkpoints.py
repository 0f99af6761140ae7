"""Open roar generator checkpoints for sampling (``load_generator``) or fine-tuning (``load_weights_into``).

Accepted paths:
  - an import folder written by ``experiments.import_official``: roar.json + model.safetensors;
  - a ``.safetensors`` file with roar.json next to it (or the same JSON embedded in its metadata);
  - a Lightning ``.ckpt`` of ours (read with weights_only=True; ``ema=True`` takes the EMA callback's weights,
    ``ema="auto"`` takes them when the checkpoint has them and the live weights otherwise; ``spec["weights_used"]``
    says which);
  - a run folder (runs/<name>/) holding checkpoints/last.ckpt.
Loading is strict (every missing / unexpected key and shape mismatch named); a checkpoint made for another
vocabulary or another tokenizer is refused with both sides named.
"""
from __future__ import annotations

import json
import os
import pickle

import torch

from lightning_modules.official.checkpoint_io import read_safetensors_metadata, strict_load
from tokenizers.base import TokenizerMismatchError

ROAR_JSON = "roar.json"
CODES = "codes"  # a codes-only tokenizer knows a vocabulary, not a codebook: only the vocabulary is compared


# One error class for every checkpoint we cannot read (resume, init_from, sample, export, edit): the CLIs catch it.
from lightning_modules.checkpointing import CheckpointError  # noqa: E402,F401


def _json_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _import_spec(meta: dict, weights: str) -> dict:
    tok = meta["tokenizer"]
    return {"model": meta["model"], "tokenizer": {"build": tok["build"]}, "sample": meta.get("sample"),
            "vocab_size": meta.get("vocab_size"), "tokenizer_fingerprint": tok.get("fingerprint"),
            "weights": weights, "kind": "import"}


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    meta = read_safetensors_metadata(path)
    if "roar.json" in meta:
        spec_meta = json.loads(meta["roar.json"])
    elif os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), ROAR_JSON)):
        spec_meta = _json_file(os.path.join(os.path.dirname(os.path.abspath(path)), ROAR_JSON))
    else:
        raise CheckpointError(f"{path}: no roar.json beside it or in its metadata (import official weights with "
                              f"python -m experiments.import_official)")
    if "model" not in spec_meta or "tokenizer" not in spec_meta:
        raise CheckpointError(f"{path}: its roar.json describes a {spec_meta.get('family', 'non-generator')} "
                              f"file, not a generator")
    return _import_spec(spec_meta, path), load_file(path, device="cpu")


def _read_lightning(path: str, ema: bool | str) -> tuple[dict, dict]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refusing to unpickle non-tensor objects ({str(err).splitlines()[0][:160]}); "
                              f"official weights go through python -m experiments.import_official") from None
    except Exception as err:  # noqa: BLE001 - anything else is not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(hp, dict) or not \
            {"model", "tokenizer"} <= set(hp):
        raise CheckpointError(f"{path}: not a roar Lightning checkpoint (no state_dict / hyper_parameters); "
                              f"import official weights with python -m experiments.import_official")
    hp, roar = dict(ckpt["hyper_parameters"]), ckpt.get("roar", {})
    sd = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    used = "live"
    if ema:
        shadows = [s["shadow"] for s in ckpt.get("callbacks", {}).values() if isinstance(s, dict) and "shadow" in s]
        if not shadows and ema is True:
            raise CheckpointError(f"{path}: ema=True but the checkpoint holds no EMA weights (trained with "
                                  f"callbacks.ema_decay=0)")
        if shadows:
            sd.update({k: v for k, v in shadows[0].items() if k in sd})
            used = "ema"
    spec = {"model": hp["model"], "tokenizer": hp["tokenizer"], "sample": hp.get("sample"), "optim": hp.get("optim"),
            "seed": hp.get("seed", 0), "max_steps": hp.get("max_steps", 1000), "vocab_size": roar.get("vocab_size"),
            "tokenizer_fingerprint": roar.get("tokenizer_fingerprint"), "weights": path, "kind": "lightning",
            "weights_used": used}
    return spec, sd


def read_checkpoint(path: str, ema: bool | str = False) -> tuple[dict, dict]:
    """-> (spec: model / tokenizer / sample sections + what the file records, backbone state dict in our names)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ROAR_JSON)):
            meta = _json_file(os.path.join(path, ROAR_JSON))
            if "weights" not in meta:
                raise CheckpointError(f"{path}: holds a {meta.get('family', 'tokenizer')} import, not a generator "
                                      f"(use it as tokenizer.path={meta.get('tokenizer', {}).get('path', '...')})")
            return _read_safetensors(os.path.join(path, meta["weights"]))
        last = os.path.join(path, "checkpoints", "last.ckpt")
        if os.path.isfile(last):
            return _read_lightning(last, ema)
        raise CheckpointError(f"{path}: neither an import folder (roar.json) nor a run folder (checkpoints/last.ckpt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.endswith(".safetensors"):
        if ema is True:
            raise CheckpointError(f"{path}: ema=True needs a Lightning checkpoint (imports were made with --ema)")
        return _read_safetensors(path)
    return _read_lightning(path, ema)


def describe_tokenizer(tokenizer_section: dict) -> str:
    build = tokenizer_section.get("build", tokenizer_section)
    return build.get("kind", "?") + (f" {build['path']}" if build.get("path") else "")


def check_tokenizer(module, spec: dict, where: str) -> None:
    """Refuse weights trained for another vocabulary, or (both sides real tokenizers) another codebook."""
    vocab, mine = spec.get("vocab_size"), module.backbone.vocab_size
    theirs = describe_tokenizer(spec["tokenizer"])
    ours = describe_tokenizer(module.hparams.tokenizer)
    if vocab is not None and int(vocab) != mine:
        raise TokenizerMismatchError(f"{where}: checkpoint vocabulary {vocab} (tokenizer {theirs}) does not match "
                                     f"the configured tokenizer's {mine} ({ours})")
    found = spec.get("tokenizer_fingerprint")
    real = CODES not in (spec["tokenizer"].get("build", {}).get("kind"), module.hparams.tokenizer["build"].get("kind"))
    if real and found and found != module.tokenizer_fingerprint:
        raise TokenizerMismatchError(f"{where}: checkpoint tokenizer {theirs} (fingerprint {found}) differs from "
                                     f"the configured {ours} (fingerprint {module.tokenizer_fingerprint})")


def _strict(backbone, sd: dict, where: str) -> None:
    """strict_load, its key / shape report raised as the one checkpoint error the CLIs catch."""
    try:
        strict_load(backbone, sd, where)
    except ValueError as err:
        raise CheckpointError(str(err).splitlines()[0]) from None


def load_generator(path: str, device="cpu", ema: bool | str = False, tokenizer: dict | None = None):
    """An ARModule in eval mode with the checkpoint's weights and sampling defaults.

    ``tokenizer`` (a tokenizer section, e.g. {"build": {"kind": "llamagen_vq", "path": ...}}) replaces the recorded
    one (an import made without --tokenizer-path decodes codes as grey levels); its vocabulary must match."""
    from lightning_modules.variants import build_module

    spec, sd = read_checkpoint(path, ema)
    kwargs = {k: spec[k] for k in ("optim", "seed", "max_steps") if spec.get(k) is not None}
    module = build_module(spec["model"], tokenizer or spec["tokenizer"], sample=spec.get("sample"), **kwargs)
    check_tokenizer(module, spec, os.fspath(path))
    _strict(module.backbone, sd, os.fspath(path))
    module.weights_used = spec.get("weights_used", "as stored")  # "ema" / "live" (Lightning), or an import/export
    return module.to(device).eval()


def load_weights_into(module, path: str, ema: bool = False) -> dict:
    """Initialise ``module``'s backbone from ``path`` for fine-tuning (train.py ``init_from=PATH``); returns the spec.

    Strict: every key and shape must match; the vocabulary (and the tokenizer, when both are real) must agree."""
    spec, sd = read_checkpoint(path, ema)
    where = f"init_from {os.fspath(path)}"
    check_tokenizer(module, spec, where)
    _strict(module.backbone, sd, where)
    return spec
