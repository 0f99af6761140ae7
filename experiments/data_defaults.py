"""What the data says about a run: the code folder's train/ and val/ parts, and the number of classes.

    data.code_dir=DIR   DIR/train/ + DIR/val/ (``pretokenize --val-shards``), or DIR itself holding the train
                        codes (``pretokenize`` without --val-shards), with DIR/val/ used for validation when it exists
    model.num_classes   unless a preset or the command line sets it: the classes.json the shard writer put beside
                        the image shards (data.kind=images), or the classes the code manifest recorded
                        (data.kind=codes). A value that is set and differs from the data's is refused naming both.
"""
from __future__ import annotations

import json
import os

from omegaconf import DictConfig

from experiments.config import ConfigError

CODE_SHARDS = "codes-*.tar"


def code_split_dirs(code_dir: str) -> tuple[str, str | None]:
    """(folder of the train codes, folder of the val codes or None) of a data.code_dir."""
    train = os.path.join(code_dir, "train")
    if not os.path.isfile(os.path.join(train, "manifest.json")):
        # DIR/train/ of a pretokenize --val-shards run that has not completed (no manifest yet) stays the train
        # folder, so the code DataModule names its missing manifest rather than finding no DIR/codes-*.tar
        flat = os.path.isfile(os.path.join(code_dir, "manifest.json")) or not os.path.isdir(train)
        train = code_dir if flat else train
    val = os.path.join(code_dir, "val")
    return train, val if os.path.isfile(os.path.join(val, "manifest.json")) else None


def manifest_shards(folder: str) -> list[str] | str:
    """The shards of a pretokenize folder: exactly those its manifest.json lists, as a rerun into the folder can
    leave other codes-*.tar beside them. Without a readable manifest, the folder's codes-*.tar: the code
    DataModule then refuses them, naming the manifest (a run that was killed, or has not finished)."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            shards = json.load(f).get("shards")
    except (OSError, ValueError, AttributeError):
        shards = None
    if not isinstance(shards, dict) or not shards:
        return os.path.join(folder, CODE_SHARDS)
    return [os.path.join(folder, name) for name in shards]


def code_shards(cfg: DictConfig) -> tuple[list[str] | str, list[str] | str | None]:
    """(train shards, val shards or None) for data.kind=codes: lists of the folders' manifests (any form
    datamodules.wds_utils.expand_shards takes); data.*_shards win over data.code_dir."""
    d = cfg.data
    train_dir, val_dir = code_split_dirs(d.code_dir) if d.code_dir else ("", None)
    train = d.train_shards or manifest_shards(train_dir)
    val = d.val_shards or (manifest_shards(val_dir) if val_dir else None)
    return train, val


def no_val_reason(cfg: DictConfig) -> str | None:
    """Why a run has no validation data (None when it has some): said once, and recorded in metrics.json."""
    d = cfg.data
    if d.kind == "embedded":
        return None
    if d.kind == "images" and not d.val_shards:
        return "no validation data: data.val_shards is empty, so val/nll is not computed"
    if d.kind == "codes" and code_shards(cfg)[1] is None:
        where = f"{d.code_dir}/val/ has no manifest.json" if d.code_dir else "no data.code_dir"
        return (f"no validation data: data.val_shards is empty and {where} (write it with tokenizers.pretokenize "
                f"--val-shards), so val/nll is not computed")
    return None


def _first_file(pattern: str) -> str | None:
    from datamodules.wds_utils import expand_shards

    try:
        urls = expand_shards(pattern, "data.train_shards")
    except (FileNotFoundError, ValueError):
        return None
    return urls[0] if urls and os.path.isfile(urls[0]) else None


def data_classes(cfg: DictConfig) -> tuple[int, str] | None:
    """(number of classes, the file that says so) from the run's training data; None when it says nothing."""
    d = cfg.data
    if d.kind == "images" and d.train_shards:
        first = _first_file(d.train_shards)
        path = os.path.join(os.path.dirname(first), "classes.json") if first else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                return len(json.load(f)), path
    elif d.kind == "codes" and (d.code_dir or d.train_shards):
        train = code_shards(cfg)[0]
        first = _first_file(train)
        path = os.path.join(os.path.dirname(first), "manifest.json") if first else ""
        if path and os.path.isfile(path):
            with open(path) as f:
                count = json.load(f).get("num_classes")
            if count:
                return int(count), path
    return None


def apply_data_defaults(cfg: DictConfig, num_classes_set: bool) -> None:
    """Fill model.num_classes from the data unless it was set; refuse a set value the data contradicts."""
    found = data_classes(cfg)
    if found is None:
        return
    count, path = found
    if not num_classes_set:
        cfg.model.num_classes = count
    elif cfg.model.num_classes != count:
        raise ConfigError("model.num_classes", f"{cfg.model.num_classes} is set, but the training data has {count} "
                                               f"classes ({path}); remove the setting (the data's count is the "
                                               f"default) or point data.* at the right shards")
