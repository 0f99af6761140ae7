"""WebDataset plumbing shared by the image-shard and code-shard DataModules.

The pipeline (one ``ShardStream`` per DataLoader, one pass per worker):

    slot's shards ─► resample/shuffle ─► tar samples ─► shuffle buffer ─► decode ──────► batches
    (rank, worker)   seeded by (seed,    (raw bytes)    (raw bytes: small  (bad ones are   dict + "_skipped",
                     rank, worker, epoch)                in memory)         skipped, counted) "_worker", "_key"

Why our own stream rather than ``wds.WebDataset(...).with_epoch(...)``: WebDataset 1.0.2 counts ``with_epoch``
per worker, needs explicit node splitters, raises on empty workers and merges the half-read sample of a truncated
shard into the next one (docs ENVIRONMENT.md §5). Here every one of those is explicit, and the skip count of each
worker travels with its batches, so it survives DataLoader worker processes:

    batch["_skipped"]  int   skip events so far in this worker's current pass (resets each pass)
    batch["_worker"]   int   DataLoader worker id (0 without workers)
    batch["_key"]      list  sample keys, for tests and debugging

The main-process side (``EpochLoader``, ``SkipTracker``) is in datamodules/loader.py. Epochs: ``SharedEpoch``
(a multiprocessing value, as in open_clip) is read by each worker when its pass starts.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
from typing import Callable, Iterator

import braceexpand
import torch
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.shards import is_local, iter_tar_samples

log = logging.getLogger("roar.data")

MAX_EMPTY_SHARD_READS = 100  # resampled mode: this many shard reads without a usable sample means a broken setup
MAX_CONSECUTIVE_SKIPS = 10_000  # resampled mode: same, for a stream where every sample fails to decode
WARN_FIRST = 5  # per worker pass: warn for the first few skips, then every 1000th


# ----------------------------------------------------------------------------- world, seeds, epochs
def world_info() -> tuple[int, int]:
    """(rank, world_size): torch.distributed when initialised (Lightning DDP), else env RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def mix_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings; stable across processes and Python runs (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class SharedEpoch:
    """An epoch number that persistent DataLoader workers can read: set in the main process, read per pass."""

    def __init__(self, epoch: int = 0):
        self._value = mp.Value("i", epoch)

    def set_value(self, epoch: int) -> None:
        self._value.value = epoch

    def get_value(self) -> int:
        return self._value.value


# ----------------------------------------------------------------------------- shard lists and manifests
def expand_shards(spec: str | list[str] | tuple[str, ...], what: str = "data.shards") -> list[str]:
    """Shard URLs from a brace pattern ("dir/train-{000000..000099}.tar"), a local glob ("dir/codes-*.tar",
    sorted), a "::"-joined list of patterns, or a list of any of these."""
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    urls = []
    for url in (u for p in parts for u in braceexpand.braceexpand(str(p))):
        if is_local(url) and any(c in url for c in "*?["):
            found = sorted(glob.glob(url))
            if not found:
                raise FileNotFoundError(f"{what}: no shards match {url}")
            urls += found
        else:
            urls.append(url)
    if not urls:
        raise ValueError(f"{what}: no shards in {spec!r}")
    return urls


def check_shards_exist(urls: list[str], what: str = "data.shards") -> None:
    """One-line FileNotFoundError naming the first missing local shard (remote URLs are not checked)."""
    for url in urls:
        if is_local(url) and not os.path.isfile(url):
            raise FileNotFoundError(f"{what}: shard not found: {url}")


def _manifest_shard_tables(manifest: dict) -> list[dict]:
    """The {name: count} tables of any of our manifest layouts (shard writer, embedded, code shards)."""
    tables = [manifest["shards"]] if isinstance(manifest.get("shards"), dict) else []
    for split in (manifest.get("splits") or {}).values():
        if isinstance(split, dict) and isinstance(split.get("shards"), dict):
            tables.append(split["shards"])
    return tables


def read_manifest_counts(urls: list[str]) -> dict[str, int] | None:
    """Sample count per shard URL from the manifest beside the shards, or None when any shard is not listed.

    Looks for "{prefix}-manifest.json" (shard writer; prefix = file name before the first "-") and
    "manifest.json" (embedded dataset, code shards) in each shard's folder.
    """
    counts: dict[str, int] = {}
    cache: dict[str, dict] = {}
    for url in urls:
        if not is_local(url):
            return None
        folder, name = os.path.split(url)
        for cand in (f"{name.split('-')[0]}-manifest.json", "manifest.json"):
            path = os.path.join(folder, cand)
            if path not in cache:
                try:
                    with open(path) as f:
                        cache[path] = json.load(f)
                except (OSError, ValueError):
                    cache[path] = {}
            hit = [t[name] for t in _manifest_shard_tables(cache[path]) if name in t]
            if hit:
                counts[url] = int(hit[0])
                break
        else:
            return None
    return counts


def slot_assignment(urls: list[str], rank: int, world: int, worker: int, workers: int) -> tuple[list[str], int, int]:
    """Which samples a (rank, worker) slot owns: (shards, mod, rem) = samples at position j % mod == rem.

    Disjoint across slots. Whole shards when there are enough of them; otherwise ranks (then workers) share a
    shard and take every mod-th sample, so fewer shards than workers or ranks still works.
    """
    slots, slot = world * workers, rank * workers + worker
    if len(urls) >= slots:
        return urls[slot::slots], 1, 0
    if len(urls) >= world:
        return urls[rank::world], workers, worker
    return list(urls), slots, slot


def slot_count(counts: dict[str, int], shards: list[str], mod: int, rem: int) -> int:
    """Samples a slot owns, from manifest counts."""
    return sum(max(0, (counts[u] - rem + mod - 1) // mod) for u in shards)


# ----------------------------------------------------------------------------- skip counting, shuffling
class PassStats:
    """Skip counter of one worker pass; warn-and-continue, with a guard against endless resampled loops."""

    def __init__(self, worker: int, strict: bool):
        self.worker, self.strict = worker, strict
        self.skipped = 0
        self.consecutive = 0
        self.empty_reads = 0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.consecutive += 1
        if self.skipped <= WARN_FIRST or self.skipped % 1000 == 0:
            log.warning("data: skipped (worker %d, %d so far): %s", self.worker, self.skipped, reason)
        if self.strict and self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(f"data: {self.consecutive} samples in a row failed; last: {reason}")

    def ok(self) -> None:
        self.consecutive = 0


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Seeded buffer shuffle (detshuffle): keep ``size`` items, emit a random one per new item, then drain."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------- the stream
def _draws(shards: list[str], rng: random.Random) -> Iterator[str]:
    while True:  # resampling with replacement: no shard list to run out of, epochs are set by sample count
        yield rng.choice(shards)


Decoder = Callable[[dict, random.Random, bool], tuple[object, int]]  # (sample, aug rng, train) -> (x, label)
Collate = Callable[[list], dict]  # list of x -> {"image": tensor [B,...]} or {"codes": ...}


class ShardStream(IterableDataset):
    """Batches from shards; one pass per ``iter()`` in each worker. See the module docstring for the pipeline.

    train + resampled: each worker draws its slot's shards with replacement and stops after
    ``batches_per_worker`` full batches (the per-worker share of samples_per_epoch). Otherwise one pass over
    the slot's samples, shard order shuffled when ``train``, the last partial batch kept.
    rank/world are captured here, in the main process: torch.distributed is not initialised in workers.
    """

    def __init__(self, urls: list[str], decode: Decoder, collate: Collate, batch_size: int, *, train: bool,
                 resampled: bool, seed: int, epoch: SharedEpoch, num_workers: int, shuffle_buffer: int = 1000,
                 batches_per_worker: int | None = None, counts: dict[str, int] | None = None):
        self.urls, self.decode, self.collate, self.batch_size = urls, decode, collate, batch_size
        self.train, self.resampled, self.seed, self.epoch = train, resampled and train, seed, epoch
        self.num_workers, self.buffer, self.counts = max(1, num_workers), shuffle_buffer, counts
        self.batches_per_worker = batches_per_worker
        self.rank, self.world = world_info()
        if self.resampled and not batches_per_worker:
            raise ValueError("data: resampled training needs batches_per_worker (from samples_per_epoch)")

    def __len__(self) -> int:  # batches per rank per pass; Lightning uses it for the epoch length
        if self.resampled:
            return self.batches_per_worker * self.num_workers
        if self.counts is None:
            raise TypeError("data: pass length unknown (no manifest beside the shards)")
        n = 0
        for w in range(self.num_workers):
            owned = slot_count(self.counts, *slot_assignment(self.urls, self.rank, self.world, w, self.num_workers))
            n += -(-owned // self.batch_size)
        return n

    def _raw(self, shards: list[str], mod: int, rem: int, rng: random.Random, stats: PassStats) -> Iterator[dict]:
        """Raw samples this slot owns; forever (resampled) or one pass."""
        if self.resampled:
            order = _draws(shards, rng)
        else:
            order = list(shards)
            if self.train:
                rng.shuffle(order)
        for url in order:
            got = 0
            for j, sample in enumerate(iter_tar_samples(url, stats.skip)):
                if j % mod == rem:
                    got += 1
                    yield sample
            stats.empty_reads = 0 if got else stats.empty_reads + 1
            if self.resampled and stats.empty_reads >= MAX_EMPTY_SHARD_READS:
                raise RuntimeError(f"data: rank {self.rank} worker {stats.worker}: {stats.empty_reads} shard reads "
                                   f"in a row gave no sample (shards {shards[0]} ... {len(shards)} in all)")

    def _decoded(self, raw: Iterator[dict], aug: random.Random, stats: PassStats) -> Iterator[tuple]:
        for sample in raw:
            try:
                x, label = self.decode(sample, aug, self.train)
            except Exception as exn:  # noqa: BLE001  corrupt member: count it, never crash the run
                stats.skip(f"{sample.get('__url__')}: key {sample.get('__key__')!r}: {type(exn).__name__}: {exn}")
                continue
            stats.ok()
            yield x, label, sample["__key__"]

    def _emit(self, items: list[tuple], stats: PassStats) -> dict:
        xs, labels, keys = zip(*items)
        batch = self.collate(list(xs))
        batch["label"] = torch.tensor(labels, dtype=torch.int64)  # [B]
        batch.update(_skipped=stats.skipped, _worker=stats.worker, _key=list(keys))
        return batch

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_info()
        epoch = self.epoch.get_value()
        shards, mod, rem = slot_assignment(self.urls, self.rank, self.world, worker, workers)
        order_rng = random.Random(mix_seed(self.seed, self.rank, worker, epoch, "order"))
        aug_rng = random.Random(mix_seed(self.seed, self.rank, worker, epoch, "augment"))
        stats = PassStats(worker, strict=self.resampled)
        raw = self._raw(shards, mod, rem, order_rng, stats)
        # resampled: the buffer is refilled every epoch, so keep it within one epoch's share of the worker
        size = min(self.buffer, self.batches_per_worker * self.batch_size) if self.resampled else self.buffer
        if self.train and size > 1:
            raw = shuffle_buffer(raw, size, order_rng)
        items: list[tuple] = []
        held: list[tuple] | None = None  # finite pass: a full batch waits for the next good sample, so skips
        emitted = 0                      # at the very end of the pass still reach the main process
        for item in self._decoded(raw, aug_rng, stats):
            if held is not None:
                yield self._emit(held, stats)
                held = None
            items.append(item)
            if len(items) < self.batch_size:
                continue
            if self.resampled:
                yield self._emit(items, stats)
                emitted += 1
                if emitted >= self.batches_per_worker:
                    return
            else:
                held = items
            items = []
        for rest in (held, items):
            if rest:
                yield self._emit(rest, stats)
