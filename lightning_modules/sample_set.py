"""The one sample-set protocol: which labels and which random streams a class-balanced sample set is made of.

Used by the FID callback (``val/fid{n}`` during training), ``experiments.sample`` (the offline ADM ``.npz``),
``experiments.ablate`` and the demo, so the offline score of a checkpoint equals the ``val/fid`` it logged:

  - sample i (global index) has class ``classes[i % len(classes)]`` (all classes: label i % num_classes);
  - samples are cut into batches of ``batch_size`` (BATCH = 100 unless changed; a set smaller than that is one
    batch); batch b is drawn by one ``generate`` call seeded with ``batch_seed(seed, b)``;
  - rank r of W takes batches r, r + W, ..., so the union over ranks is the same set for any W.

The batch size is part of the protocol (one generator per batch), not a speed knob: change it and the images change.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

BATCH = 100  # the protocol's default batch: the FID callback, sample, ablate and the demo all use it


def count_tag(n: int) -> str:
    """50000 -> '50k', 1000 -> '1k', 200 -> '200', 1500 -> '1500' (the suffix of val/fid{n})."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one sampling batch: a hash, so neighbouring (seed, batch) pairs never share or shift streams."""
    digest = hashlib.sha256(f"roar-fid:{int(seed)}:{int(batch_index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class SampleBatch:
    index: int  # batch number b
    labels: torch.Tensor  # long [n_b]
    samples: torch.Tensor  # long [n_b]: global sample indices
    seed: int  # batch_seed(seed, b)


def num_batches(num_samples: int, batch_size: int = BATCH) -> int:
    return -(-num_samples // batch_size)


def sample_batches(num_samples: int, classes: list[int] | int, batch_size: int = BATCH, seed: int = 0,
                   rank: int = 0, world_size: int = 1) -> list[SampleBatch]:
    """This rank's batches of the set. ``classes``: the class ids, or a count (= range(count))."""
    classes = list(range(classes)) if isinstance(classes, int) else list(classes)
    if num_samples <= 0 or not classes or batch_size <= 0:
        raise ValueError(f"sample set: num_samples, classes and batch_size must be > 0 / non-empty "
                         f"(got {num_samples}, {len(classes)} classes, {batch_size})")
    table = torch.tensor(classes)
    out = []
    for b in range(rank, num_batches(num_samples, batch_size), world_size):
        index = torch.arange(b * batch_size, min((b + 1) * batch_size, num_samples))
        out.append(SampleBatch(b, table[index % len(classes)], index, batch_seed(seed, b)))
    return out


def eval_plan(num_samples: int, num_classes: int, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1) -> list[tuple[int, torch.Tensor, torch.Tensor, int]]:
    """This rank's batches as tuples [(batch index, labels [b], global sample index [b], seed)]."""
    return [(s.index, s.labels, s.samples, s.seed)
            for s in sample_batches(num_samples, num_classes, batch_size, seed, rank, world_size)]


def timed_sample_set(module, num_samples: int, batch_size: int, seed: int,
                     **overrides) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The class-balanced set of ``num_samples`` (this protocol, one rank) sampled at ``overrides`` -> (images uint8
    [n, 3, H, W] on the CPU, labels long [n], images/s): ablate's and the demo's speed figure. Where ``generate``
    takes the fast path (sampling.fast_path: sample.compile=on, or auto with CUDA), each batch size is sampled once
    untimed first: torch.compile's first calls (tens of seconds per configuration, more for orderings with more step
    shapes) and CUDA-graph recording would otherwise rank orderings by their compile time. The images are the same
    (a batch is deterministic given its labels and seed); the eager loop is timed as it runs."""
    import time

    from lightning_modules.sampling import fast_path

    warm_up = fast_path(module.sample_settings(**overrides).compile, module.device)
    images, labels_all, seconds, warm = [], [], 0.0, set()
    for _, labels, _, seed_b in eval_plan(num_samples, module.backbone.num_classes, batch_size, seed):
        if warm_up and len(labels) not in warm:
            module.sample_images(labels, seed_b, **overrides)
            warm.add(len(labels))
        start = time.perf_counter()
        images.append(module.sample_images(labels, seed_b, **overrides).cpu())  # .cpu(): timed to completion
        seconds += time.perf_counter() - start
        labels_all.append(labels.cpu())
    images = torch.cat(images)
    return images, torch.cat(labels_all), len(images) / seconds
