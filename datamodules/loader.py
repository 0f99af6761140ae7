"""The main-process side of the shard pipeline (datamodules/wds_utils.py makes the batches in the workers).

``SkipTracker`` turns the per-worker ``batch["_skipped"]`` counts into a rank-local total (max per worker per
pass, summed over passes); the DataStatsCallback all-reduces it across ranks. ``EpochLoader`` sets the epoch the
workers read when their pass starts (``SharedEpoch``), from Lightning's ``set_epoch`` or by counting passes, and
is resumable mid-epoch through Lightning's stateful-loader protocol.
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from datamodules.wds_utils import ShardStream

log = logging.getLogger("roar.data")


class SkipTracker:
    """Rank-local skip total from batch["_skipped"/"_worker"]: max per worker within a pass, summed over passes."""

    def __init__(self):
        self.finished = 0
        self.current: dict[int, int] = {}

    def new_pass(self) -> None:
        self.finished += sum(self.current.values())
        self.current = {}

    def update(self, batch: dict) -> None:
        if isinstance(batch, dict) and "_skipped" in batch:
            w = int(batch["_worker"])
            self.current[w] = max(self.current.get(w, 0), int(batch["_skipped"]))

    def total(self) -> int:
        return self.finished + sum(self.current.values())


class _EpochIterator:
    """Starts the real DataLoader pass lazily, on the first next(): Lightning calls iter() before set_epoch()."""

    def __init__(self, loader: "EpochLoader"):
        self.loader, self.it = loader, None
        self.replayed_skips: dict[int, int] = {}  # worker -> its running skip count at the end of a replay

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.it is None:
            replay = self.loader._begin_pass()
            self.it = DataLoader.__iter__(self.loader)
            for _ in range(replay):  # resumed mid-epoch: regenerate the batches already trained on, drop them
                done = next(self.it)
                if isinstance(done, dict) and "_skipped" in done:
                    w = int(done["_worker"])
                    self.replayed_skips[w] = max(self.replayed_skips.get(w, 0), int(done["_skipped"]))
        batch = next(self.it)
        if self.replayed_skips and isinstance(batch, dict) and "_skipped" in batch:
            # the checkpoint's totals already hold the replayed batches' skips: report only those since the resume
            batch["_skipped"] = int(batch["_skipped"]) - self.replayed_skips.get(int(batch["_worker"]), 0)
        self.loader.tracker.update(batch)
        self.loader._epochs.batches += 1
        return batch


class _EpochPlan:
    """The epoch of the next pass (set_epoch's, else the last + 1) and the current (epoch, batches handed out)."""

    def __init__(self):
        self.next, self.pending, self.epoch, self.batches = 0, None, None, 0
        self.resume: tuple[int, int] | None = None  # (epoch, batches) from load_state_dict

    def set(self, epoch: int) -> None:
        self.pending = int(epoch)

    def take(self) -> tuple[int, int]:
        epoch = self.next if self.pending is None else self.pending
        replay = self.resume[1] if self.resume is not None and self.resume[0] == epoch else 0
        self.next, self.pending, self.epoch, self.batches, self.resume = epoch + 1, None, epoch, replay, None
        return epoch, replay


class EpochLoader(DataLoader):
    """DataLoader over a ShardStream (batches are made in the workers: batch_size=None) that sets the epoch.

    Lightning calls ``set_epoch`` on ``loader.sampler`` at each epoch start, so the default sampler forwards it
    here; without Lightning each new pass takes the next epoch number. Workers read it when their pass starts.
    Resumable through Lightning's stateful-loader protocol (``state_dict`` is saved in every checkpoint).
    """

    def __init__(self, stream: ShardStream, num_workers: int, persistent_workers: bool = True, **kw):
        super().__init__(stream, batch_size=None, num_workers=num_workers,
                         persistent_workers=persistent_workers and num_workers > 0,
                         pin_memory=torch.cuda.is_available(), **kw)
        self.tracker = SkipTracker()
        self._epochs = _EpochPlan()
        # the default _InfiniteConstantSampler gets the hook; a box, not a bound method of the loader: a
        # loader -> sampler -> loader cycle leaves shutdown to the GC, which then hangs 5 s per worker
        self.sampler.set_epoch = self._epochs.set

    def set_epoch(self, epoch: int) -> None:
        self._epochs.set(epoch)

    def _begin_pass(self) -> int:
        epoch, replay = self._epochs.take()
        self.dataset.epoch.set_value(epoch)
        self.tracker.new_pass()
        return replay

    def __iter__(self) -> _EpochIterator:
        return _EpochIterator(self)

    def state_dict(self) -> dict:
        """Position in the current pass; a resumed loader regenerates the batches before it and drops them."""
        p, s = self._epochs, self.dataset
        upcoming = (p.next if p.pending is None else p.pending, 0)  # before the first pass
        epoch, batches = (p.epoch, p.batches) if p.epoch is not None else p.resume or upcoming
        if batches and (s.resampled or s.counts is not None) and batches >= len(self):
            epoch, batches = epoch + 1, 0  # the pass is complete: resume at the start of the next epoch
        # no rank in the layout: rank 0's checkpoint serves every rank, and all ranks stand at the same batch
        return {"epoch": epoch, "batches": batches, "layout": [len(s.urls), s.batch_size, s.num_workers, s.seed,
                                                               s.world]}

    def load_state_dict(self, state: dict) -> None:
        if state["layout"] == self.state_dict()["layout"]:  # else another stream: replaying it would be wrong
            self._epochs.resume = (int(state["epoch"]), int(state["batches"]))
            self._epochs.next = int(state["epoch"])  # without Lightning's set_epoch, the next pass is that one
        else:
            log.warning("data: not resuming mid-epoch: the loader layout changed since the checkpoint")
