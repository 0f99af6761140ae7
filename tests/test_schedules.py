"""lightning_modules/schedules.py against the numbers read off the official generate loops (schedules.json),
plus the invariants every step schedule keeps for any step count: exactly T non-empty steps summing to N."""
from __future__ import annotations

import json

import pytest

from conftest import parity_fixture
from lightning_modules.schedules import arpg_counts, cfg_scale, randar_counts, rar_random_ratio, step_counts


@pytest.fixture(scope="module")
def official():
    with open(parity_fixture("schedules.json")) as f:
        return json.load(f)


def parse_nt(key: str) -> tuple[int, int]:
    n, t = key.split("_")
    return int(n[1:]), int(t[1:])


def test_randar_tokens_per_step(official):
    lists = official["randar_tokens_per_step"]
    assert len(lists) >= 6
    for key, expected in lists.items():
        n, t = parse_nt(key)
        assert randar_counts(n, t) == expected, key


@pytest.mark.parametrize("kind", ["arccos", "cosine"])
def test_arpg_tokens_per_step(official, kind):
    lists = official["arpg_tokens_per_step"][kind]
    assert len(lists) >= 4
    for key, expected in lists.items():
        n, t = parse_nt(key)
        assert arpg_counts(n, t, kind) == expected, f"{kind} {key}"
        assert step_counts(kind, n, t) == expected


def test_randar_cfg_linear_uses_the_count_before_each_step(official):
    ref = official["randar_cfg_linear"]
    start, end = ref["cfg_scales"]
    counts = randar_counts(ref["N"], ref["T"])
    assert counts == ref["tokens_per_step"]
    before = [sum(counts[:i]) for i in range(len(counts))]
    assert before == ref["decoded_before_step"]
    scales = [cfg_scale("linear", end, b, ref["N"], start=start) for b in before]
    assert scales == ref["scale"]  # exact: same formula, same float op order
    assert scales[0] == 1.0 and scales[-1] == 3.953125  # never reaches the end value


def test_arpg_cfg_linear_uses_the_count_including_each_step(official):
    ref = official["arpg_cfg_linear"]
    counts = arpg_counts(ref["N"], ref["T"], ref["sample_schedule"])
    assert counts == ref["tokens_per_step"]
    including = [sum(counts[: i + 1]) for i in range(len(counts))]
    assert including == ref["decoded_including_step"]
    scales = [cfg_scale("linear", ref["guidance_scale"], c, ref["N"], start=1.0) for c in including]
    assert scales == ref["scale"]
    assert scales[-1] == ref["guidance_scale"]


@pytest.mark.parametrize("key", ["g16.0_pow2.75", "g6.9_pow1.5"])
def test_rar_guidance_pow_cosine(official, key):
    ref = official["rar_guidance_pow_cosine"]
    g, p = (float(x) for x in key[1:].split("_pow"))
    n = ref["N"]
    ours = [cfg_scale("pow_cosine", g, t, n, power=p) for t in range(n)]
    assert ours == ref[key]  # float32 values, reproduced bit for bit
    assert ours[0] == 1.0


def test_rar_random_ratio(official):
    ref = official["rar_random_ratio"]
    cfg = ref["config"]
    for step, value in ref["values"].items():
        assert rar_random_ratio(int(step), cfg["randomness_anneal_start"], cfg["randomness_anneal_end"]) == value, step


def check_counts(counts: list[int], n: int, t: int, name: str) -> None:
    assert len(counts) == t, f"{name} N={n} T={t}: {len(counts)} steps"
    assert sum(counts) == n, f"{name} N={n} T={t}: sums to {sum(counts)}"
    assert min(counts) >= 1, f"{name} N={n} T={t}: an empty step {counts}"


SCHEDULE_FUNCTIONS = {"randar": randar_counts, "arccos": lambda n, t: arpg_counts(n, t, "arccos"),
                      "cosine": lambda n, t: arpg_counts(n, t, "cosine")}


@pytest.mark.parametrize("name", sorted(SCHEDULE_FUNCTIONS))
def test_every_step_count_gives_t_nonempty_steps(name):
    fn = SCHEDULE_FUNCTIONS[name]
    for t in range(1, 17):
        check_counts(fn(16, t), 16, t, name)
    for t in (1, 2, 3, 7, 32, 64, 88, 100, 200, 255, 256):
        check_counts(fn(256, t), 256, t, name)


def test_out_of_range_step_counts_are_refused():
    for fn in SCHEDULE_FUNCTIONS.values():
        with pytest.raises(ValueError, match="num_steps"):
            fn(16, 0)
        with pytest.raises(ValueError, match="num_steps"):
            fn(16, 17)
    with pytest.raises(ValueError, match="num_steps"):
        step_counts("one_per_step", 16, 8)
    assert step_counts("one_per_step", 16, 16) == [1] * 16
