"""Import an officially released checkpoint (LlamaGen GPT, RandAR, ARPG, RAR, LlamaGen VQ, MaskGIT VQ) into roar.

    python -m experiments.import_official --family randar --ckpt RANDAR_L.safetensors \\
        --config RandAR-L --out runs/import/randar_L
    python -m experiments.import_official --family llamagen_vq --ckpt vq_ds16_c2i.safetensors --out runs/import/vq16

Generators write OUT/model.safetensors (our backbone's weights) and OUT/roar.json (family, our `model` section,
the `tokenizer` section, the released sampling defaults for that size, the source file's sha256); sample with
``python -m experiments.sample --ckpt OUT --out DIR`` or fine-tune with ``experiments.train init_from=OUT``.
Tokenizers write OUT/tokenizer.safetensors (+ tokenizer.json, roar.json), used as
``tokenizer.kind=llamagen_vq tokenizer.path=OUT/tokenizer.safetensors``.
The file is read safely (safetensors, or torch weights_only=True: pickled objects are refused with a conversion
hint) and checked strictly against the official key set of the configuration: every missing / unexpected key and
shape mismatch is listed. --config takes a released preset (GPT-B/L/XL/XXL, RandAR-L/XL, ARPG-L/XL/XXL,
RAR-B/L/XL/XXL, vq16/vq8, maskgit_1024) or a JSON/YAML file with the official constructor arguments; without it
the preset is recognised from the weights' shapes. Exit codes: 0 written; 1 the checkpoint does not fit; 2 usage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys

from lightning_modules.official import GENERATORS, TOKENIZERS, module_of

FORMAT = "roar-import/1"


class CheckpointMismatch(ValueError):
    """The checkpoint / config / tokenizer does not fit (exit code 2, like every bad input)."""


# ---------------------------------------------------------------------------------------------- configs
# What each family released (sizes, architectures, sampling rows, name prefixes) is in its module's RELEASES;
# lightning_modules/official/__init__.py lists the interface used here. module_of, not generators.family_module,
# so that importing this CLI (and --help) does not pull in torch; argparse has checked --family already.
def preset_size(family: str, name: str) -> str | None:
    """'GPT-L', 'gpt_l', 'RandAR-XL', 'RAR-B', 'L' -> the size key of the family's RELEASES (None if not a preset)."""
    fam = module_of(family)
    text = name.strip().lower()
    # a bare size first: the prefix pattern below would read "xl" as prefix "x" + size "l"
    m = re.fullmatch(r"(b|l|xl|xxl)", text) or re.fullmatch(r"([a-z]+?)[-_ ]?(b|l|xl|xxl)", text)
    if m is None or (m.lastindex == 2 and m.group(1) not in fam.NAME_PREFIXES):
        return None
    size = m.group(m.lastindex).upper()
    return size if size in fam.RELEASES else None


def match_release(family: str, cfg: dict) -> str | None:
    """The released size whose architecture equals ``cfg`` (picks the published sampling row), else None."""
    fam = module_of(family)
    arch = tuple(fam.architecture(cfg))
    return next((s for s, rel in fam.RELEASES.items() if tuple(rel["arch"]) == arch), None)


def read_config_file(path: str) -> dict:
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                from omegaconf import OmegaConf

                cfg = OmegaConf.to_container(OmegaConf.load(f), resolve=True)
            else:
                cfg = json.load(f)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointMismatch(f"--config {path}: cannot read ({type(err).__name__}: {reason})") from None
    if not isinstance(cfg, dict):
        raise CheckpointMismatch(f"--config {path}: expected a mapping of constructor arguments")
    return cfg


def resolve_generator_config(family: str, config: str | None, sd: dict,
                             image_size: int | None) -> tuple[dict, str | None]:
    """(official constructor kwargs, released size or None) from --config, or recognised from the weights."""
    fam = module_of(family)
    if config and os.path.isfile(config):
        cfg = read_config_file(config)
        if image_size:
            cfg = fam.resize_config(cfg, image_size)
        return cfg, match_release(family, cfg)
    if config:
        size = preset_size(family, config)
        if size is None:
            names = ", ".join(f"{fam.NAME_PREFIXES[0].upper()}-{s}" for s in fam.RELEASES)
            raise CheckpointMismatch(f"--config {config!r}: neither a file nor a {family} preset ({names})")
    else:
        size = fam.infer_size(sd)
        if size is None:
            raise CheckpointMismatch(f"--config: the weights match no released {family} size; pass --config with a "
                               f"JSON/YAML file of the official constructor arguments")
    return fam.official_config(size, image_size), size


def sample_section(family: str, size: str | None, num_positions: int) -> dict:
    """The official defaults of the family, with the row published for this size."""
    fam = module_of(family)
    sample = dict(fam.SAMPLE_DEFAULTS)
    if size is not None:
        sample.update(fam.RELEASES[size]["sample"])
    if num_positions != 256:  # 88 / 64 steps are for 16x16 grids: let the ordering scale its default instead
        sample.pop("num_steps", None)
    return sample


# ---------------------------------------------------------------------------------------------- checks
def check_keys(expected: dict, sd: dict, what: str) -> None:
    """expected: name -> shape. One ValueError listing every missing / unexpected key and shape mismatch."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(v)}" for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v)]
    parts = ([f"{len(missing)} missing keys {missing}"] if missing else []) + \
            ([f"{len(unexpected)} unexpected keys {unexpected}"] if unexpected else []) + \
            ([f"{len(shapes)} shape mismatches [{'; '.join(shapes)}]"] if shapes else [])
    if parts:
        raise CheckpointMismatch(f"{what}: does not match the configuration: " + ", ".join(parts))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_section(family: str, vocab: int, path: str | None, kind: str | None) -> dict:
    """Codes-only (just the vocabulary) by default; else a real tokenizer file whose vocabulary must match."""
    if not path:
        return {"build": {"kind": "codes", "vocab_size": vocab}}
    from tokenizers.registry import build_tokenizer

    kind = kind or module_of(family).DEFAULT_TOKENIZER
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.safetensors")  # a folder written by this script
    path = os.path.abspath(path)
    tok = build_tokenizer(kind, path=path)
    if tok.vocab_size != vocab:
        raise CheckpointMismatch(f"vocabulary mismatch: tokenizer {path} ({kind}) has {tok.vocab_size} codes but the "
                           f"{family} checkpoint predicts {vocab}")
    return {"build": {"kind": kind, "path": path}, "fingerprint": tok.fingerprint}


# ---------------------------------------------------------------------------------------------- import
def import_generator(args) -> dict:
    from lightning_modules.official.checkpoint_io import load_state_dict_file, save_state_dict_file
    from lightning_modules.official.generators import build_generator, official_state_dict, vocab_of

    fam = module_of(args.family)
    sd = load_state_dict_file(args.ckpt, prefer_ema=args.ema)
    cfg, size = resolve_generator_config(args.family, args.config, sd, args.image_size)
    vocab = vocab_of(args.family, cfg)
    tokenizer = tokenizer_section(args.family, vocab, args.tokenizer_path, args.tokenizer_family)
    # The official key set of this configuration, from our module tree built on the meta device (no memory).
    skeleton = build_generator(args.family, cfg, device="meta")
    expected = {k: tuple(v.shape) for k, v in official_state_dict(skeleton, args.family).items()}
    check_keys(expected, sd, f"{args.ckpt}")
    ours = fam.to_ours(sd)
    check_keys({k: tuple(v.shape) for k, v in skeleton.backbone.state_dict().items()}, ours, f"{args.ckpt} (mapped)")
    model = fam.model_config(cfg)
    meta = {"format": FORMAT, "family": args.family, "variant": model["variant"], "release": size,
            "model": model, "tokenizer": tokenizer,
            "sample": sample_section(args.family, size, skeleton.num_positions),
            "vocab_size": vocab, "weights": "model.safetensors",
            "official": {"config": cfg, "source": os.path.basename(args.ckpt), "sha256": sha256_of(args.ckpt),
                         "ema": bool(args.ema)}}
    os.makedirs(args.out, exist_ok=True)
    save_state_dict_file(os.path.join(args.out, "model.safetensors"), ours,
                         {"roar.json": json.dumps(meta, sort_keys=True)})
    write_json(os.path.join(args.out, "roar.json"), meta)
    meta["num_params"] = sum(math.prod(v.shape) for v in ours.values())
    return meta


def import_tokenizer(args) -> dict:
    from lightning_modules.official.checkpoint_io import save_tokenizer

    fam = module_of(args.family)
    overrides, preset = {}, fam.DEFAULT_PRESET
    if args.config and os.path.isfile(args.config):
        overrides = read_config_file(args.config)
    elif args.config:
        preset = args.config
    tok = fam.load_official(args.ckpt, preset, args.ema, overrides)
    weights, _ = save_tokenizer(tok, args.out, args.family)
    meta = {"format": FORMAT, "family": args.family, "kind": args.family, "vocab_size": tok.vocab_size,
            "fingerprint": tok.fingerprint, "tokenizer": {"kind": args.family, "path": os.path.abspath(weights)},
            "official": {"config": tok.config(), "source": os.path.basename(args.ckpt),
                         "sha256": sha256_of(args.ckpt), "ema": bool(args.ema)}}
    write_json(os.path.join(args.out, "roar.json"), meta)
    return meta


def write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.import_official", description=__doc__.splitlines()[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=GENERATORS + TOKENIZERS)
    p.add_argument("--ckpt", required=True, help="local official weights (.safetensors, .pt, .bin)")
    p.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                   help="released preset name or a JSON/YAML file of official constructor kwargs")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's resolution (e.g. 384)")
    p.add_argument("--ema", action="store_true", help="take the file's 'ema' weights")
    p.add_argument("--tokenizer-path", default=None, help="a tokenizer weights file / folder to record (checked)")
    p.add_argument("--tokenizer-family", default=None, choices=TOKENIZERS)
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.family in TOKENIZERS and (args.tokenizer_path or args.image_size):
        print(f"error: --tokenizer-path / --image-size apply to generator families, not {args.family}", file=sys.stderr)
        return 2
    try:
        meta = import_generator(args) if args.family in GENERATORS else import_tokenizer(args)
    except (ValueError, KeyError, FileNotFoundError) as err:  # checkpoint_io / strict errors are one line already
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {msg if not isinstance(err, KeyError) else f'{args.ckpt}: missing entry {err}'}",
              file=sys.stderr)
        return 2  # bad input: a missing / unreadable / foreign file, or weights that do not fit the config
    if args.family in GENERATORS:
        print(f"roar: imported {args.family} ({meta['release'] or 'custom config'}, {meta['num_params'] / 1e6:.1f}M "
              f"parameters) -> {args.out}/model.safetensors, {args.out}/roar.json")
        print(f"roar: sample with: python -m experiments.sample --ckpt {args.out} --out DIR")
    else:
        print(f"roar: imported {args.family} (vocabulary {meta['vocab_size']}) -> {meta['tokenizer']['path']}")
        print(f"roar: use with: tokenizer.kind={args.family} tokenizer.path={meta['tokenizer']['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
