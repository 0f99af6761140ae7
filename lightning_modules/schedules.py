"""Pure schedule functions, each pinned to the official numbers in tests (fixtures/parity/schedules.json).

Step-count schedules (how many tokens each decode step emits), CFG-scale schedules, and RAR's permutation
probability r(step). Everything here is a pure function of its arguments — no state pushed from a loop.
"""
from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------- step-count schedules
def _fit_steps(counts: list[int], total: int, steps: int) -> list[int]:
    """Guarantee exactly ``steps`` non-empty steps summing to ``total``; official lists pass through unchanged.

    The official loops can run dry before T steps (or leave tokens) in corner cases; here every step keeps at
    least one token and the last takes the remainder, so any T in [1, N] gives T forward passes.
    """
    out, done = [], 0
    for s, n in enumerate(counts[:steps]):
        left_after = steps - s - 1
        n = max(1, min(n, total - done - left_after))
        out.append(n)
        done += n
    out[-1] += total - done
    return out


def randar_counts(total: int, steps: int) -> list[int]:
    """RandAR `calculate_num_query_tokens_for_parallel_decoding`: step 0 decodes 1; step s>=1 reaches
    min(int((1 - cos(pi/2 * (s+1)/T)) * N + 1), N) decoded tokens (at least 1 new)."""
    check_steps(total, steps)
    if steps == 1:
        return [total]
    counts, done = [1], 1
    for s in range(1, steps):
        target = min(int((1 - math.cos(math.pi / 2 * (s + 1) / steps)) * total + 1), total)
        n = min(max(target - done, 1), total - done)
        counts.append(n)
        done += n
    return _fit_steps(counts, total, steps)


def arpg_counts(total: int, steps: int, kind: str = "arccos") -> list[int]:
    """ARPG `sample_schedule`: mask_len = clamp(int(N * ratio(t)), 1, N - decoded - 1); the last step takes the rest.
    ratio = arccos((t+1)/T) / (pi/2) ("arccos", the default) or cos(pi/2 * (t+1)/T) ("cosine")."""
    check_steps(total, steps)
    counts, done = [], 0
    for t in range(steps):
        if t == steps - 1:
            counts.append(total - done)
            break
        x = (t + 1) / steps
        ratio = math.acos(x) / (math.pi / 2) if kind == "arccos" else math.cos(math.pi / 2 * x)
        mask_len = max(1, min(total - done - 1, int(total * ratio)))
        n = total - done - mask_len
        counts.append(n)
        done += n
    return _fit_steps(counts, total, steps)


def one_per_step(total: int, steps: int) -> list[int]:
    if steps != total:
        raise ValueError(f"sample.num_steps: this ordering decodes one token per step, so it needs {total}, "
                         f"got {steps}")
    return [1] * total


STEP_SCHEDULES = {
    "one_per_step": one_per_step,
    "randar_cosine": randar_counts,
    "arccos": lambda n, t: arpg_counts(n, t, "arccos"),
    "cosine": lambda n, t: arpg_counts(n, t, "cosine"),
}


def step_counts(schedule: str, total: int, steps: int) -> list[int]:
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f"sample.schedule: unknown schedule {schedule!r} (choose from {sorted(STEP_SCHEDULES)})")
    return STEP_SCHEDULES[schedule](total, steps)


def check_steps(total: int, steps: int) -> None:
    if not 1 <= steps <= total:
        raise ValueError(f"sample.num_steps must be in [1, {total}], got {steps}")


# ---------------------------------------------------------------- CFG schedules
def cfg_scale(kind: str, guidance: float, count: int, total: int, power: float = 1.0, start: float = 1.0) -> float:
    """Guidance scale for a step, from ``count`` decoded tokens out of ``total`` (which count is the ordering's
    choice: RandAR and RAR use the count before the step, ARPG the count including it).

    constant:   s = g
    linear:     s = start + (g - start) * count / N              (RandAR cfg_scales=(start, g); ARPG start=1)
    pow_cosine: s = 1 + (g - 1) * (1 - cos(pi * (count/N)^p)) / 2  (RAR, computed in float32 like the official)
    """
    if kind == "constant":
        return float(guidance)
    if kind == "linear":
        return start + (guidance - start) * count / total
    if kind == "pow_cosine":
        frac = torch.tensor(count / total, dtype=torch.float32) ** power
        s = (guidance - 1) * (1 - torch.cos(frac * math.pi)) / 2 + 1
        return float(s)
    raise ValueError(f"sample.cfg_schedule: unknown CFG schedule {kind!r} (constant, linear, pow_cosine)")


# ---------------------------------------------------------------- RAR's permutation probability
def rar_random_ratio(step: int, anneal_start: int, anneal_end: int) -> float:
    """r = 1 up to and including ``anneal_start``, linear to 0 at ``anneal_end``, then 0 (RAR Eq. 5, in steps)."""
    if step <= anneal_start:
        return 1.0
    if step >= anneal_end:
        return 0.0
    return 1.0 - (step - anneal_start) / (anneal_end - anneal_start)
