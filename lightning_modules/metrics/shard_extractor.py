"""A feature extractor for your own labelled image shards (any resolution, RGB), and the domain check every
extractor passes before it scores anything.

FID needs features that mean something for the data. Inception's do for natural images (ImageNet-like, given its
weights file); the digits CNN's only for the embedded grey digits (on 64 px photos it gave FID ~493 for every arm).
``ShardCNN`` is trained, deterministically, to classify the classes of the shards it is given, at their resolution
(``python -m experiments.train_extractor --shards ...``). Its file records its domain: the resolution, the class map
(classes.json of the shard writer), the shards and their fingerprint. ``check_domain`` refuses, in one line, an
extractor used on samples of another resolution, or against a reference from another dataset.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.metrics.extractors import (FeatureExtractor, _check_uint8, _deterministic_cpu, _state_hash,
                                                  fit_classifier)

KEY = "eval.extractor_weights"


def classes_digest(class_map: dict) -> str:
    """Identity of a dataset's label space: the same classes.json beside its train and val shards."""
    return hashlib.sha256(json.dumps(class_map, sort_keys=True).encode()).hexdigest()[:12]


def shard_domain(pattern: str) -> dict:
    """{"shards", "fingerprint" (names + sizes), "classes", "classes_digest"} of an image-shard pattern."""
    from datamodules.wds_utils import check_shards_exist, expand_shards

    urls = expand_shards(pattern, "--shards")
    check_shards_exist(urls, "--shards")
    fp = hashlib.sha256(json.dumps([(os.path.basename(u), os.path.getsize(u)) for u in urls]).encode()).hexdigest()
    path = os.path.join(os.path.dirname(urls[0]), "classes.json")
    classes = json.load(open(path)) if os.path.isfile(path) else None
    return {"shards": os.path.abspath(pattern), "fingerprint": fp[:16], "classes": classes,
            "classes_digest": classes_digest(classes) if classes else None}


class ShardCNN(FeatureExtractor):
    scores_labels = True
    """RGB [R, R] -> stride-2 convs down to 4x4 -> F-d feature (pre-ReLU: no dead dimensions) -> K logits."""

    def __init__(self, image_size: int, num_classes: int, width: int = 16, num_features: int = 64,
                 domain: dict | None = None):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"--image-size: {image_size} is too small for the shard CNN (>= 8)")
        self.config = {"image_size": image_size, "num_classes": num_classes, "width": width,
                       "num_features": num_features}
        self.image_size, self.num_features, self.num_classes = image_size, num_features, num_classes
        self.domain = dict(domain or {}, kind="shards", image_size=image_size)
        # every conv halves (the first one too: a few MFLOPs per 64 px image, so it trains in seconds on a CPU)
        layers, ch, size = [nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU()], width, (image_size + 1) // 2
        while size > 4:  # down to 4x4 (or below, for sizes that are not powers of two)
            out = min(ch * 2, 4 * width)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.ReLU()]
            ch, size = out, (size + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(ch * 16, num_features)
        self.head = nn.Linear(num_features, num_classes)
        self.name = "shard-cnn-untrained"

    def _forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.adaptive_avg_pool2d(self.conv(x), 4).flatten(1)
        h = self.proj(h)
        return h, self.head(F.relu(h))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8(images)
        if tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"{KEY}: the shard extractor {self.name} was trained at {self.image_size}x"
                             f"{self.image_size} px, these images are {images.shape[-2]}x{images.shape[-1]}")
        x = images.to(self.device, torch.float32) / 127.5 - 1.0
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def _features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward_float(self.preprocess(images))


def shard_images(pattern: str, image_size: int, max_images: int = 0, crop: str = "adm") -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(uint8 [N, 3, S, S], int64 [N]) of the shards in file order, ADM centre crop at ``image_size`` (what the
    pretokenizer encodes and the shard reference of experiments.evaluate reads; ``crop="none"``: a plain square
    resize, as the image DataModule's center_crop=none); corrupt samples skipped and counted."""
    from datamodules.wds_utils import check_shards_exist, expand_shards
    from lightning_modules.metrics.reference import decoded_shard_images

    urls = expand_shards(pattern, "--shards")
    check_shards_exist(urls, "--shards")
    images, labels, skipped = [], [], []
    for image, label in decoded_shard_images(urls, image_size, skipped, crop, labels=True):
        images.append(image)
        labels.append(label)
        if max_images and len(images) >= max_images:
            break
    if not images:
        raise ValueError(f"--shards {pattern}: no readable images")
    if skipped:
        print(f"shard images: skipped {len(skipped)} corrupt sample(s), e.g. {skipped[0]}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip and a shift of up to S/16 px (reflect padding): features that do not hinge on exact placement."""
    b, _, s, _ = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, s // 16)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(s))[:, :, None]
    cols = (dx[:, None] + torch.arange(s))[:, None, :]
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def _accuracy(model: ShardCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred = torch.cat([model.logits(images[i:i + 256]).argmax(-1) for i in range(0, len(images), 256)])
    return float((pred == labels).float().mean())


def train_shard_extractor(shards: str, image_size: int, val_shards: str = "", seed: int = 0, epochs: int = 30,
                          batch_size: int = 64, lr: float = 2e-3, width: int = 16, num_features: int = 64,
                          max_images: int = 0, log=None) -> tuple[ShardCNN, dict]:
    """Train the shard CNN to classify ``shards`` (bit-identical for the same seed: one thread, deterministic ops)."""
    domain = shard_domain(shards)
    if val_shards:  # before any work: val labels index the train class map, or the val accuracy means nothing
        from datamodules.wds_utils import expand_shards
        from tokenizers.pretokenize import check_same_classes

        check_same_classes(expand_shards(shards, "--shards"), expand_shards(val_shards, "--val-shards"))
    x_tr, y_tr = shard_images(shards, image_size, max_images)
    val = shard_images(val_shards, image_size) if val_shards else None
    num_classes = len(domain["classes"]) if domain["classes"] else int(y_tr.max()) + 1
    if int(y_tr.max()) >= num_classes:
        raise ValueError(f"--shards: label {int(y_tr.max())} outside the {num_classes} classes of classes.json")
    with _deterministic_cpu():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = ShardCNN(image_size, num_classes, width, num_features, domain)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        fit_classifier(model, x_tr.float() / 127.5 - 1.0, y_tr, _augment, gen, opt, sched, epochs, batch_size, log)
        info = {"kind": "shards", "config": model.config, "domain": model.domain, "seed": seed, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "num_train": len(y_tr),
                "train_accuracy": _accuracy(model, x_tr, y_tr), "torch_version": torch.__version__}
        if val is not None:
            info.update(val_accuracy=_accuracy(model, *val), num_val=len(val[1]),
                        val_shards=os.path.abspath(val_shards))
    return model, info


def save_shard_extractor(model: ShardCNN, path: str, info: dict) -> str:
    """safetensors with config and domain in its metadata (the file alone is loadable and checkable) + a json."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"kind": "shards", "config": json.dumps(model.config, sort_keys=True),
                                     "domain": json.dumps(model.domain, sort_keys=True)})
    name = f"shard-cnn-{model.image_size}px-{_state_hash(state)}"
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(info, weights=os.path.basename(path), name=name), f, indent=2, sort_keys=True)
    return name


def load_shard_extractor(path: str, meta: dict) -> ShardCNN:
    from safetensors.torch import load_file

    model = ShardCNN(**json.loads(meta["config"]), domain=json.loads(meta.get("domain", "{}")))
    state = load_file(path)
    model.load_state_dict(state)
    model.name = f"shard-cnn-{model.image_size}px-{_state_hash(state)}"
    model.weights_path = path
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Domain check: which extractor may score which samples against which reference
# ---------------------------------------------------------------------------------------------------------------
def reference_classes(ref: str) -> tuple[dict | None, str]:
    """(classes.json of a shard reference, its path) or (None, "") for .npz / digits / shards without one."""
    if not ref or ref.endswith(".npz") or ref == "digits" or ref.startswith("digits:"):
        return None, ""
    from datamodules.wds_utils import expand_shards

    try:
        first = expand_shards(ref.split(",")[0], "eval.reference")[0]
    except (FileNotFoundError, ValueError):
        return None, ""
    path = os.path.join(os.path.dirname(first), "classes.json")
    return (json.load(open(path)), path) if os.path.isfile(path) else (None, "")


DIGIT_CLASSES = {str(i): i for i in range(10)}


def check_domain(extractor, image_size: int | None, ref: str, first_batch: np.ndarray | None = None) -> None:
    """One-line ValueError when ``extractor`` was trained on another domain or resolution than the samples
    (``image_size``, ``first_batch`` uint8 NHWC) or the reference ``ref``. Inception (any natural image) passes."""
    domain = getattr(extractor, "domain", None)
    if not domain:
        return
    classes, where = reference_classes(ref)
    if domain["kind"] == "digits":
        fix = ("train one on your shards (python -m experiments.train_extractor --shards ...) and use "
               "--extractor shards / eval.extractor=shards, or Inception")
        if classes is not None and classes != DIGIT_CLASSES:
            raise ValueError(f"{KEY}: the digits CNN was trained on the embedded 8x8 digits, not on the "
                             f"{len(classes)} classes of {where}; {fix}")
        if first_batch is not None and first_batch.ndim == 4 and first_batch.shape[-1] == 3:
            colour = float(np.abs(np.diff(first_batch.astype(np.int16), axis=-1)).mean())
            if colour > 8:  # grey digits decode with R = G = B (a VQ adds at most a few levels)
                raise ValueError(f"{KEY}: the samples are colour images (mean channel difference {colour:.0f}); the "
                                 f"digits CNN was trained on grey digits; {fix}")
        return
    size = domain.get("image_size")
    if image_size is not None and size and image_size != size:
        raise ValueError(f"{KEY}: {extractor.name} was trained on {size} px images ({domain.get('shards')}), the "
                         f"samples are {image_size} px: train one at {image_size} px")
    if ref == "digits" or ref.startswith("digits:"):
        raise ValueError(f"{KEY}: {extractor.name} was trained on {domain.get('shards')}, not on the embedded digits "
                         f"(--ref {ref})")
    if classes is not None and domain.get("classes_digest") and classes_digest(classes) != domain["classes_digest"]:
        trained = len(domain.get("classes") or {})
        raise ValueError(f"{KEY}: {extractor.name} was trained on {domain.get('shards')} ({trained} "
                         f"classes), the reference {ref} is another dataset ({where}: {len(classes)} classes)")
