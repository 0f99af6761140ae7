"""Feature extractors for FID / IS / precision-recall: torch-fidelity's InceptionV3 and a small digits CNN.

Both take uint8 images [B, C, H, W] (C = 3, or 1 for grey) of any size and expose the same surface:
``features(x) -> [B, F]`` (float32), ``logits(x) -> [B, K]``, ``features_and_logits(x)`` (one forward pass),
``forward = features`` (so the module can also be handed to torchmetrics as ``feature=``), ``num_features``,
``num_classes`` and a stable ``name`` (kind + hash of the weights) used to key cached reference statistics.

* ``inception``: InceptionV3 in torch-fidelity's layout (the TF 2015-12-05 weights converted), 2048-d pool3
  features and 1008-way logits *without* the fc bias, because that is what the ADM evaluator's softmax sees.
  Loaded only from a local file (config key ``eval.inception_weights``); we check the path ourselves because
  torch-fidelity / torchmetrics silently fall back to a download when it is missing.
* ``shards``: a CNN trained on your own labelled image shards at their resolution (shard_extractor.py), for data
  that is neither ImageNet-like nor the digits; its file records the domain it fits.
* ``digits``: a 3-conv CNN for the embedded 8x8 digits (64-d features, 10 logits), trained deterministically by
  ``python -m experiments.train_extractor``. Inputs are converted to grey and resized to 8x8 first.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.tf32 import cuda_tf32

INCEPTION_KEY = "eval.inception_weights"
DIGITS_KEY = "eval.extractor_weights"
KINDS = ("inception", "digits", "shards")  # shards: a CNN trained on your labelled shards (shard_extractor.py)
# The one default location of the digits CNN (the FID callback, evaluate, ablate, the demo and train_tokenizer all
# read it; each trains it, deterministically and in seconds, when it is missing)
DEFAULT_DIGITS_WEIGHTS = os.path.join("runs", "extractors", "digits.safetensors")


def _file_hash(path: str, n: int = 12) -> str:
    """Short content hash: keys caches on the weights themselves, not on where the file happens to live."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _state_hash(state: dict, n: int = 12) -> str:
    """Hash of the tensors themselves: safetensors' header order (a Rust HashMap) varies between writes of the
    same weights, so the file bytes are not a stable identity."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:n]


def _check_uint8(x: torch.Tensor) -> None:
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] in (1, 3)):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        dtype = x.dtype if torch.is_tensor(x) else "-"
        raise ValueError(f"extractor input must be uint8 [B, 3 or 1, H, W], got {dtype} {shape}")


class FeatureExtractor(nn.Module):
    """Common surface. Never leaves eval mode: a parent's ``.train()`` must not flip BatchNorm statistics."""

    name: str = "extractor"
    num_features: int = 0
    num_classes: int = 0
    # True when the head classifies the dataset's own labels (digits / shard CNNs), so that class-consistency of
    # class-conditional samples is defined; Inception's 1008-way head is not aligned with a generator's label ids
    scores_labels: bool = False

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, F], logits [B, K]) of uint8 images, in IEEE fp32 on CUDA whatever trainer.tf32 /
        sample.tf32 say: a score must not depend on the GPU generation, and the val/fid a run logs (inside its
        TF32 scope) must equal the offline score of its checkpoint (experiments.evaluate, outside it)."""
        with cuda_tf32(False):
            return self._features_and_logits(images)

    def _features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# ----------------------------------------------------------------------------------------------------------------
# InceptionV3 (torch-fidelity layout, local file only)
# ----------------------------------------------------------------------------------------------------------------
def check_inception_weights(path: str | os.PathLike | None) -> str:
    """Fail with one line naming the config key before torch-fidelity could try to download the weights."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"{INCEPTION_KEY} is empty: set it to a local InceptionV3 weights file in torch-fidelity's "
                         "layout (weights-inception-2015-12-05-6726825d.pth); nothing is downloaded")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{INCEPTION_KEY}: file not found: {path} (a local torch-fidelity InceptionV3 "
                                "weights file is required; nothing is downloaded)")
    return path


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's FeatureExtractorInceptionV3 (TF1-compatible bilinear resize to 299, as the ADM graph)."""

    num_features = 2048
    num_classes = 1008

    def __init__(self, weights_path: str):
        super().__init__()
        weights_path = check_inception_weights(weights_path)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=weights_path)
        except RuntimeError as e:  # load_state_dict's message lists hundreds of keys: keep the first line
            raise ValueError(f"{INCEPTION_KEY}: {weights_path} is not a torch-fidelity InceptionV3 state dict "
                             f"({str(e).splitlines()[0]})") from None
        self.weights_path = weights_path
        self.name = f"inception-v3-compat-{_file_hash(weights_path)}"
        self.eval()

    @torch.no_grad()
    def _features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_uint8(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        feats, logits = self.net(images.to(self.device))  # [B, 2048], [B, 1008] (no bias: ADM's softmax input)
        return feats.float(), logits.float()


# ----------------------------------------------------------------------------------------------------------------
# Digits CNN
# ----------------------------------------------------------------------------------------------------------------
class DigitsCNN(FeatureExtractor):
    scores_labels = True
    """8x8 grey -> 3 convs -> 64-d feature (pre-ReLU, so no dead dims make the covariance singular) -> 10 logits."""

    input_size = 8

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "num_features": num_features, "num_classes": num_classes}
        self.num_features, self.num_classes = num_features, num_classes
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # [B, 2w, 4, 4]
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.proj = nn.Linear(2 * width * 16, num_features)
        self.head = nn.Linear(num_features, num_classes)
        self.name = "digits-cnn-untrained"
        self.domain = {"kind": "digits", "classes": 10}  # the embedded grey digits (shard_extractor.check_domain)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float [B, 1, 8, 8] in [0, 1] (antialiased resize keeps larger renders comparable)."""
        _check_uint8(images)
        x = images.to(self.device, torch.float32).mean(1, keepdim=True) / 255.0
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return x

    def _forward_float(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(self.conv(x).flatten(1))  # [B, F]
        return h, self.head(F.relu(h))         # [B, F], [B, K]

    @torch.no_grad()
    def _features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward_float(self.preprocess(images))


@contextlib.contextmanager
def _deterministic_cpu() -> Iterator[None]:
    """One thread + deterministic kernels: the same seed gives bit-identical weights on any core count."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 px (zero fill): cheap augmentation so features don't hinge on exact placement."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))                                   # [B, 1, h+2, w+2]
    dy, dx = torch.randint(0, 3, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]               # [B, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]               # [B, 1, w]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def _accuracy(model: DigitsCNN, images: np.ndarray, labels: np.ndarray) -> float:
    x = torch.from_numpy(images)[:, None]                             # [n, 1, 8, 8] uint8
    pred = model.logits(x).argmax(-1).numpy()
    return float((pred == labels).mean())


def fit_classifier(model, x_all: torch.Tensor, y_all: torch.Tensor, augment, gen: torch.Generator, opt, sched,
                   epochs: int, batch_size: int, log=None) -> None:
    """The extractors' training loop (digits and shard CNNs): cross-entropy on augmented minibatches of a seeded
    permutation per epoch, cosine LR per epoch; x_all float [n, C, H, W] already scaled as the model expects."""
    nn.Module.train(model, True)  # bypass the eval-only override for training
    for epoch in range(epochs):
        perm = torch.randperm(len(y_all), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            _, logits = model._forward_float(augment(x_all[idx], gen))
            loss = F.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if log is not None and (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{epochs} loss {total / len(perm):.4f}")
    model.eval()


def train_digits_extractor(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3,
                           log=None) -> tuple[DigitsCNN, dict]:
    """Train the digits CNN on the embedded train split (fixed split seed 0); returns (model, info)."""
    from datamodules.digits import digits_arrays

    xtr, ytr = digits_arrays("train", seed=0)
    xva, yva = digits_arrays("val", seed=0)
    with _deterministic_cpu():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitsCNN()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        x_all = torch.from_numpy(xtr).float()[:, None] / 255.0        # [n, 1, 8, 8]
        y_all = torch.from_numpy(ytr)
        fit_classifier(model, x_all, y_all, _random_shift, gen, opt, sched, epochs, batch_size, log)
        info = {"kind": "digits", "config": model.config, "seed": seed, "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "train_accuracy": _accuracy(model, xtr, ytr), "val_accuracy": _accuracy(model, xva, yva),
                "num_train": len(ytr), "num_val": len(yva), "torch_version": torch.__version__}
    return model, info


def save_digits_extractor(model: DigitsCNN, path: str, info: dict) -> None:
    """Weights as safetensors (config in its metadata, so the file alone is loadable) + a json sidecar."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"kind": "digits", "config": json.dumps(model.config, sort_keys=True)})
    info = dict(info, weights=os.path.basename(path), name=f"digits-cnn-{_state_hash(state)}")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def _weights_metadata(path: str | os.PathLike | None, empty_hint: str, train_args: str = "") -> tuple[str, dict]:
    """(expanded path, safetensors metadata) of an extractor weights file; an empty or missing path is one error
    naming the key and the command that trains the file (``train_args`` go before its ``--out``)."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"{DIGITS_KEY} is empty: {empty_hint}")
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{DIGITS_KEY}: file not found: {path} "
                                f"(train it: python -m experiments.train_extractor {train_args}--out {path})")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return path, f.metadata() or {}


def load_digits_extractor(path: str | os.PathLike | None) -> DigitsCNN:
    from safetensors.torch import load_file

    path, meta = _weights_metadata(path, "train one with "
                                   "`python -m experiments.train_extractor --out runs/extractors/digits.safetensors`")
    if meta.get("kind") != "digits" or "config" not in meta:
        hint = ("; it is a shard extractor: use --extractor shards / eval.extractor=shards"
                if meta.get("kind") == "shards" else "")
        raise ValueError(f"{DIGITS_KEY}: {path} is not a digits extractor (safetensors metadata lacks "
                         f"kind/config){hint}")
    model = DigitsCNN(**json.loads(meta["config"]))
    state = load_file(path)
    model.load_state_dict(state)
    model.name = f"digits-cnn-{_state_hash(state)}"
    model.weights_path = path
    return model.eval()


def load_shards_extractor(path: str | os.PathLike | None) -> FeatureExtractor:
    """A CNN trained on your own shards (``python -m experiments.train_extractor --shards ...``)."""
    from lightning_modules.metrics.shard_extractor import load_shard_extractor

    path, meta = _weights_metadata(path, "train an extractor on your shards with `python -m "
                                   "experiments.train_extractor --shards 'DIR/train-*.tar' --image-size S --out FILE`",
                                   "--shards 'DIR/train-*.tar' --image-size S ")
    if meta.get("kind") != "shards" or "config" not in meta:
        raise ValueError(f"{DIGITS_KEY}: {path} is not a shard extractor (its kind is {meta.get('kind')!r}; "
                         f"--extractor / eval.extractor must match the file)")
    return load_shard_extractor(path, meta)


def load_extractor(kind: str, path: str | os.PathLike | None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """``kind`` in KINDS; ``path`` a local weights file (never downloaded)."""
    if kind == "inception":
        model: FeatureExtractor = InceptionExtractor(path)  # type: ignore[arg-type]
    elif kind == "digits":
        model = load_digits_extractor(path)
    elif kind == "shards":
        model = load_shards_extractor(path)
    else:
        raise ValueError(f"eval.extractor: unknown extractor kind {kind!r} (choose from {KINDS})")
    return model.to(device).eval()
