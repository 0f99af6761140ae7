"""Progress of long jobs (sampling, evaluation, pretokenizing, reference statistics, FID, sweeps).

On a terminal: a tqdm bar. Anywhere else (SLURM logs, CI, pipes) a bar rewrites its line with carriage returns and
floods the log file, so instead one status line is printed every ``every_s`` seconds (and at the end):

    sample: 1200/50000 images (2.4%), 38.1 images/s, elapsed 0:00:31, eta 0:21:20

We keep this thin wrapper (tqdm does the bar) only for that non-TTY policy, which tqdm has no mode for.
``ROAR_PROGRESS=bar|lines|off`` forces the mode of every enabled one (a disabled one, e.g. on a rank other than 0,
stays off); ``ROAR_PROGRESS_EVERY_S`` sets the line interval (default 30 s).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
MODES = ("bar", "lines", "off")


def _mode(enabled: bool, stream) -> str:
    forced = os.environ.get("ROAR_PROGRESS", "")
    if forced and forced not in MODES:
        raise ValueError(f"ROAR_PROGRESS: {forced!r} is not one of {list(MODES)}")
    if not enabled:  # e.g. a rank other than 0, or a quiet run: the environment does not turn it back on
        return "off"
    return forced or ("bar" if getattr(stream, "isatty", lambda: False)() else "lines")


def progress_mode(stream=None) -> str:
    """"bar", "lines" or "off": what an enabled progress display on ``stream`` (stderr) shows here."""
    return _mode(True, stream or sys.stderr)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update(n)`` as work completes; ``close()`` (or use as a context manager) prints the final line."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 every_s: float | None = None, stream=None, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.initial = initial  # done before this start (a resumed run): left out of the rate and the eta
        self.postfix = ""  # appended to each line (e.g. the latest loss)
        self.stream = stream or sys.stderr
        self.mode = _mode(enabled, self.stream)
        self.every_s = float(os.environ.get("ROAR_PROGRESS_EVERY_S", 30) if every_s is None else every_s)
        self.done, self.start, self.last_line = initial, time.time(), time.time()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, initial=initial)

    def line(self) -> str:
        elapsed = time.time() - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.1f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"eta {_clock((self.total - self.done) / rate)}")
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines" and time.time() - self.last_line >= self.every_s:
            self.last_line = time.time()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines":
            print(self.line(), file=self.stream, flush=True)
        self.mode = "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
          every_s: float | None = None, weight=None) -> Iterator[T]:
    """Iterate with progress; ``weight(item)`` = how many units an item is worth (e.g. images in a batch)."""
    with Progress(total, desc, unit, enabled, every_s) as p:
        for item in iterable:
            yield item
            p.update(weight(item) if weight else 1)
