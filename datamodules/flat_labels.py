"""Labels of a flat image folder (ImageNet's val/ is 50,000 JPEGs with no class folders), for datamodules.shards.

Formats of ``--labels FILE`` (detected from the file):
  * two columns, one image per line, ``NAME LABEL`` (whitespace or comma separated; a header line is skipped):
    NAME is the file name with or without its extension, LABEL a WordNet synset (``n01751748``) or a class index
    into classes.json. Covers Caffe's ``val.txt`` (``ILSVRC2012_val_00000001.JPEG 65``) and Kaggle's
    ``LOC_val_solution.csv`` (``ILSVRC2012_val_00008726,n02119789 255 142 ...``: the first word of the second
    column is the synset).
  * the ILSVRC2012 devkit ground truth, ``ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012_ID (1..1000) per
    line for the images in file-name order; it needs ``--devkit-meta data/meta.mat`` (the same devkit), whose
    ``synsets`` table maps each ID to its synset. IDs are not our class indices: ours are the sorted synset
    folders of the train split, so every label goes through the synset.
Synsets become class indices through the class map (``classes.json`` of the train split, in --out or --classes).
"""
from __future__ import annotations

import os
import re

SYNSET = re.compile(r"^n\d{8}$")


def _rows(path: str) -> list[list[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--labels: file not found: {path}")
    with open(path) as f:
        return [re.split(r"[,\s]+", line.strip()) for line in f if line.strip()]


def devkit_synsets(meta_path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's meta.mat (its ``synsets`` struct array)."""
    if not meta_path:
        raise ValueError("--labels: a devkit ground-truth file (one ILSVRC2012_ID per line) needs --devkit-meta "
                         "ILSVRC2012_devkit_t12/data/meta.mat to map the IDs to synsets")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"--devkit-meta: file not found: {meta_path}")
    from scipy.io import loadmat

    try:
        synsets = loadmat(meta_path, squeeze_me=True)["synsets"]
        ids, wnids = synsets["ILSVRC2012_ID"], synsets["WNID"]
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise ValueError(f"--devkit-meta: {meta_path} has no synsets table with ILSVRC2012_ID and WNID "
                         f"({err})") from None
    return {int(i): str(w) for i, w in zip(ids.ravel(), wnids.ravel())}


def read_labels(path: str, names: list[str], devkit_meta: str = "") -> dict[str, str | int]:
    """{file name in ``names``: synset or class index} for the sorted ``names`` of a flat folder."""
    rows = _rows(path)
    if not rows:
        raise ValueError(f"--labels: {path} is empty")
    if all(len(r) == 1 and r[0].isdigit() for r in rows):  # devkit ground truth: IDs in file-name order
        if len(rows) != len(names):
            raise ValueError(f"--labels: {path} has {len(rows)} ground-truth IDs for {len(names)} images in --src")
        table = devkit_synsets(devkit_meta)
        missing = sorted({int(r[0]) for r in rows} - set(table))
        if missing:
            raise ValueError(f"--devkit-meta: {devkit_meta} has no synset for ILSVRC2012_ID {missing[0]}")
        return {name: table[int(r[0])] for name, r in zip(names, rows)}
    by_stem = {os.path.splitext(n)[0]: n for n in names}
    out: dict[str, str | int] = {}
    for lineno, r in enumerate(rows, 1):
        if len(r) < 2:
            raise ValueError(f"--labels: {path}:{lineno}: expected 'NAME LABEL', got {' '.join(r)!r}")
        name, label = r[0], r[1]
        if lineno == 1 and not (SYNSET.match(label) or label.isdigit()):
            continue  # a header (ImageId,PredictionString)
        if not (SYNSET.match(label) or label.isdigit()):
            raise ValueError(f"--labels: {path}:{lineno}: label {label!r} is neither a synset nor a class index")
        file = name if name in names else by_stem.get(name) or by_stem.get(os.path.splitext(name)[0])
        if file is not None:
            out[file] = int(label) if label.isdigit() else label
    unlabelled = [n for n in names if n not in out]
    if unlabelled:
        raise ValueError(f"--labels: {path} has no label for {len(unlabelled)} image(s) in --src, e.g. {unlabelled[0]}")
    return out


def to_indices(labels: dict[str, str | int], class_map: dict[str, int] | None, where: str) -> dict[str, int]:
    """Synsets through ``class_map``; class indices checked against its size."""
    if class_map is None:
        raise ValueError("--labels: no class map: write the train split into --out first (its classes.json) or "
                         "pass --classes classes.json")
    out = {}
    for name, label in labels.items():
        if isinstance(label, int):
            if not 0 <= label < len(class_map):
                raise ValueError(f"--labels: class index {label} of {name} outside [0, {len(class_map)}) ({where})")
            out[name] = label
        elif label not in class_map:
            raise ValueError(f"--labels: synset {label} of {name} is not in {where}")
        else:
            out[name] = class_map[label]
    return out
