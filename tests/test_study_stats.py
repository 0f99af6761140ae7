"""Confidence intervals and overlap marks of the order study's tables."""
from __future__ import annotations

import math
import random

import pytest

from experiments.study_stats import interval, overlap_groups, t_quantile


def test_t_interval_matches_the_textbook_value():
    iv = interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t(0.975, 2) = 4.303
    assert iv.mean == 2.0 and t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert iv.half_width == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert iv.text(2) == "2.00 ± 2.48"


def test_one_seed_has_no_interval_and_missing_values_are_dropped():
    iv = interval([0.5, None, float("nan")])
    assert iv.n == 1 and iv.half_width is None and iv.text(1) == "0.5 (1 seed)"
    assert interval([]).n == 0


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(0)
    hits = sum(interval([rng.gauss(3.0, 2.0) for _ in range(3)]).overlaps(interval([3.0]))
               for _ in range(2000))
    assert 0.93 < hits / 2000 < 0.97


def test_overlap_groups_mark_the_arms_a_ranking_cannot_separate():
    groups = overlap_groups({"a": interval([1.0, 1.1, 0.9]), "b": interval([1.05, 1.2, 0.95]),
                             "c": interval([3.0, 3.1, 2.9])})
    assert groups["a"] == ["b"] and groups["b"] == ["a"] and groups["c"] == []
