"""Locality-aware parallel decode order (``sample.schedule=locality``) for orderings that decode in any order.

None of the original codebases has this. Why it should help: tokens decoded in the same step are drawn
independently given the context, so two neighbours decoded together cannot agree with each other, while a token
next to decoded context is better conditioned than one in empty space. The order is built step by step, for any
tokens-per-step schedule (the counts of the ordering's default schedule: RandAR's cosine, ARPG's arccos):

  - within a step, picks are greedy farthest-point: the next pick maximises its distance to the positions already
    picked in this step, capped at the spacing s = sqrt(undecoded / n_t) of an even spread (beyond s a pick is
    "far enough" and the distance stops counting);
  - among positions equally far, those with more decoded (or known) 8-neighbours win;
  - a seeded random priority per position breaks what is left, so the order is a function of the generator.

    score(p) = min(d(p, picked this step), s) / s  +  CONTEXT_WEIGHT * decoded_neighbours(p) / 8  +  JITTER * u(p)

Step-mates are not context for each other (they are decoded together), so neighbour counts update per step.
Shapes: h x w grid, N = h*w positions in raster order, B orders, n_t tokens in step t.
"""
from __future__ import annotations

import math

import torch


LOCALITY = "locality"
CONTEXT_WEIGHT = 0.25  # < 1: spread first, context second (a full-context neighbour never beats a far pick)
JITTER = 1e-3  # below every real score difference (distance steps >= ~0.01, context steps = 0.03)


def grid_geometry(grid: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (pairwise distances float [N, N], 8-neighbourhood adjacency float [N, N]) of raster positions."""
    h, w = grid
    rr, cc = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    coords = torch.stack([rr.flatten(), cc.flatten()], -1).float()  # [N, 2]
    dist = torch.cdist(coords, coords)  # [N, N]
    adj = ((dist > 0) & (dist < 1.5)).float()  # the 8 neighbours (distance 1 or sqrt 2)
    return dist, adj


@torch.no_grad()
def locality_order(grid: tuple[int, int], counts: list[int], batch: int, generator: torch.Generator | None,
                   known: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Orders long [B, N]: known positions first (raster order), then the steps of ``counts`` as described above.

    known: bool [N] or None. sum(counts) must equal N - known.sum().
    """
    h, w = grid
    N = h * w
    known = torch.zeros(N, dtype=torch.bool, device=device) if known is None else known.to(device).bool()
    if sum(counts) != N - int(known.sum()):
        raise ValueError(f"sample.schedule=locality: counts sum to {sum(counts)}, but {N - int(known.sum())} "
                         f"positions are unknown")
    dist, adj = grid_geometry(grid, device)
    priority = torch.rand(batch, N, generator=generator, device=device)  # [B, N] seeded tie-break
    decoded = known[None].expand(batch, -1).clone()  # [B, N]
    rows = torch.arange(batch, device=device)
    parts = [known.nonzero().flatten()[None].expand(batch, -1)]
    undecoded = N - int(known.sum())
    for n in counts:
        context = (decoded.float() @ adj) / 8  # [B, N] fraction of decoded neighbours, frozen for the step
        spacing = math.sqrt(undecoded / n)
        nearest = torch.full((batch, N), float("inf"), device=device)  # distance to this step's picks
        picks = []
        for _ in range(n):
            score = nearest.clamp(max=spacing) / spacing + CONTEXT_WEIGHT * context + JITTER * priority
            p = score.masked_fill(decoded, float("-inf")).argmax(-1)  # [B]
            decoded[rows, p] = True
            nearest = torch.minimum(nearest, dist[p])
            picks.append(p)
        parts.append(torch.stack(picks, 1))
        undecoded -= n
    return torch.cat(parts, 1)


def step_groups(order: torch.Tensor, counts: list[int], num_known: int = 0) -> list[torch.Tensor]:
    """Split orders [B, N] into the position groups decoded together: one long [B, n_t] per step."""
    return list(order[:, num_known:].split(counts, dim=1))


def mean_min_spread(order: torch.Tensor, counts: list[int], grid: tuple[int, int], num_known: int = 0) -> float:
    """Mean over samples and steps with n_t >= 2 of the smallest distance between two positions of the step.

    The measurable property of a parallel order: larger = step-mates further apart."""
    dist, _ = grid_geometry(grid, order.device)
    values = []
    for group in step_groups(order, counts, num_known):
        if group.shape[1] < 2:
            continue
        d = dist[group[:, :, None], group[:, None, :]]  # [B, n, n]
        d = d + torch.eye(group.shape[1], device=d.device) * 1e9
        values.append(d.flatten(1).min(1).values)
    return float(torch.cat(values).mean()) if values else float("nan")


def isolated_fraction(order: torch.Tensor, counts: list[int], grid: tuple[int, int],
                      known: torch.Tensor | None = None, num_known: int = 0) -> float:
    """Fraction of decoded positions with no decoded (or known) 8-neighbour when their step starts; lower = better
    conditioned. (The *mean* neighbour count is no measure: summed over a whole order it only depends on how many
    adjacent pairs share a step, so it mirrors the spread.)"""
    B, N = order.shape
    _, adj = grid_geometry(grid, order.device)
    decoded = torch.zeros(B, N, dtype=torch.bool, device=order.device)
    if known is not None:
        decoded[:, known.to(order.device)] = True
    rows = torch.arange(B, device=order.device)[:, None]
    alone = []
    for group in step_groups(order, counts, num_known):
        context = decoded.float() @ adj  # [B, N]
        alone.append((torch.gather(context, 1, group) == 0).float().flatten())
        decoded[rows, group] = True
    return float(torch.cat(alone).mean())
