"""Seed statistics for comparative tables: mean +- 95% confidence interval, and which arms' intervals overlap.

With k seeds the interval is the Student-t one, mean +- t(0.975, k-1) * s / sqrt(k) (s: the sample standard
deviation), the usual choice for a handful of seeds; one seed has no interval (reported as such, never as +-0).
Two arms whose intervals overlap are not separated by this many seeds: the table marks them instead of ranking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None: fewer than 2 values
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)

    def overlaps(self, other: "Interval") -> bool:
        """True when the two intervals share a point (a single-seed value overlaps whatever contains it)."""
        return self.low <= other.high and other.low <= self.high

    def text(self, digits: int = 3) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean +- the t confidence half-width of ``values`` (NaN / None values are dropped, and counted out)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return Interval(float("nan"), None, 0)
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return Interval(mean, None, len(xs))
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return Interval(mean, t_quantile(len(xs) - 1, confidence) * math.sqrt(var / len(xs)), len(xs))


def overlap_groups(intervals: dict[str, Interval], lower_is_better: bool = True) -> dict[str, list[str]]:
    """For each arm, the arms whose interval overlaps its own (in ranked order): the ones it is not separated from."""
    ranked = sorted(intervals, key=lambda k: intervals[k].mean, reverse=not lower_is_better)
    return {a: [b for b in ranked if b != a and intervals[a].overlaps(intervals[b])] for a in ranked}
