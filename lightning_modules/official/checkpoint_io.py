"""Reading and writing weight files for every official importer, without ever unpickling arbitrary objects.

- ``.safetensors`` files are read with safetensors (tensors + string metadata only).
- Anything else goes through ``torch.load(weights_only=True)``. Official LlamaGen checkpoints pickle an
  ``argparse.Namespace`` under "args", which weights_only refuses: we then stop with a one-line error that tells
  the user how to re-save only the state dict once, in an environment they trust. We never fall back to
  ``weights_only=False`` ourselves.
- ``strict_load`` lists every missing key, unexpected key and shape mismatch in one error and loads nothing
  unless everything matches (``nn.Module.load_state_dict`` reports shapes only after key problems are fixed).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

SUB_DICTS = ("model", "state_dict")  # where training checkpoints keep the weights (checked in this order)
META_KIND, META_CONFIG, META_FINGERPRINT = "roar.kind", "roar.config", "roar.fingerprint"


class UnsafeCheckpointError(ValueError):
    """The file pickles non-tensor objects; it must be converted once by the user (we never unpickle it)."""


def conversion_hint(path: str) -> str:
    """A python one-liner that re-saves only the weights of ``path`` as safetensors (run where the file is trusted)."""
    out = os.path.splitext(path)[0] + ".safetensors"
    return ("python -c \"import torch; from safetensors.torch import save_file; "
            f"ck = torch.load('{path}', map_location='cpu', weights_only=False); "
            "sd = next((ck[k] for k in ('ema', 'model', 'state_dict') if isinstance(ck, dict) and k in ck), ck); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\"")


def _first_line(err: BaseException) -> str:
    """The informative line of a (often multi-line, ANSI-coloured) torch error."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:  # torch puts the actual reason ("Unsupported global: GLOBAL argparse.Namespace ...") last
        if "Unsupported global" in ln or "WeightsUnpickler error" in ln:
            return ln.split(" was not an allowed global")[0][:200]
    return lines[0][:200] if lines else err.__class__.__name__


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} when it has none or is another format)."""
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _pick_state_dict(obj, path: str, prefer_ema: bool) -> dict:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of name -> tensor), got {type(obj).__name__}")
    if prefer_ema:
        if not isinstance(obj.get("ema"), Mapping):
            raise ValueError(f"{path}: prefer_ema=True but the file has no 'ema' state dict (top-level keys: "
                             f"{sorted(map(str, obj))[:10]})")
        return dict(obj["ema"])
    for key in SUB_DICTS:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    if "ema" in obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj["ema"])  # an EMA-only export
    return dict(obj)


def load_state_dict_file(path: str, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (.safetensors, or a torch file readable with weights_only=True).

    Training checkpoints are unwrapped: "ema" when ``prefer_ema``, else "model" or "state_dict". A DDP
    "module." prefix on every key is stripped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: weights file not found (roar never downloads weights; give a local path)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # weights_only refused a non-tensor object
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle non-tensor objects ({_first_line(err)}); if you trust the file, "
                f"convert it once with: {conversion_hint(path)}") from None
        except Exception as err:  # noqa: BLE001 - anything else is not a weights file we can read
            raise ValueError(f"{path}: not a readable torch or safetensors weights file "
                             f"({err.__class__.__name__}: {_first_line(err)})") from None
    sd = _pick_state_dict(obj, path, prefer_ema)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state dict entries that are not tensors: {bad[:10]}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Load ``state_dict`` into ``module`` only if keys and shapes match exactly; else one ValueError naming all."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: file {list(state_dict[k].shape)} vs model {list(v.shape)}"
                  for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches [{'; '.join(mismatched)}]")
        raise ValueError(f"{what}: state dict does not match the model (nothing loaded): " + ", ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True)
    return module


def resolve_config(path: str, kind_names: tuple[str, ...], preset: str | None, overrides: dict,
                   preset_config: Callable[..., dict], default_preset: str) -> dict:
    """Constructor config for a weights file: the config embedded by ``save_tokenizer`` when present
    (explicit preset / overrides must then agree with it), else ``preset_config(preset or default, **overrides)``."""
    meta = read_safetensors_metadata(path)
    if META_CONFIG not in meta:
        return preset_config(preset or default_preset, **overrides)
    if meta.get(META_KIND) not in kind_names:
        raise ValueError(f"{path}: holds a {meta.get(META_KIND)!r} tokenizer, expected one of {list(kind_names)}")
    cfg = json.loads(meta[META_CONFIG])
    wanted = preset_config(preset, **overrides) if preset else dict(overrides)
    for key, value in wanted.items():
        if key in cfg and cfg[key] != value:
            raise ValueError(f"{path}: tokenizer.{key}={value!r} disagrees with the file's config ({cfg[key]!r})")
    return cfg


def save_state_dict_file(path: str, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write a .safetensors file (tensors made contiguous and moved to CPU; metadata values must be str)."""
    from safetensors.torch import save_file

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: weights are written as .safetensors only")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)


def save_tokenizer(tokenizer: nn.Module, out_dir: str, kind: str) -> tuple[str, str]:
    """``out_dir/tokenizer.safetensors`` (config embedded as metadata) + ``out_dir/tokenizer.json``."""
    cfg, fingerprint = tokenizer.config(), tokenizer.fingerprint
    weights = os.path.join(out_dir, "tokenizer.safetensors")
    save_state_dict_file(weights, tokenizer.state_dict(), {
        META_KIND: kind, META_CONFIG: json.dumps(cfg, sort_keys=True), META_FINGERPRINT: fingerprint})
    info = os.path.join(out_dir, "tokenizer.json")
    with open(info, "w") as f:
        json.dump({"kind": kind, "name": tokenizer.name, "config": cfg, "fingerprint": fingerprint,
                   "vocab_size": tokenizer.vocab_size, "downsample": tokenizer.downsample,
                   "weights": "tokenizer.safetensors"}, f, indent=2, sort_keys=True)
    return weights, info
