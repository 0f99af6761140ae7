"""Order policies: ``sample.schedule`` values that choose *where* an any-order ordering decodes, not how many:
``locality`` (lightning_modules/locality.py) and ``halton`` (lightning_modules/halton.py).

A policy keeps the step sizes of the ordering's default count schedule (RandAR's cosine, ARPG's arccos) over the
unknown positions and replaces the random decode order by a structured one. Every policy is an order function

    order_fn(grid, counts, batch, generator, known bool [N] | None, device) -> long [B, N]   (known positions first)

registered below; orderings that declare ``any_order`` route ``sample.schedule=<policy>`` here
(``ordering.AnyOrder.decode_plan``) and nothing else needs to know the policy exists.
"""
from __future__ import annotations

from lightning_modules.halton import HALTON, halton_order
from lightning_modules.locality import LOCALITY, locality_order
from lightning_modules.sampling import DecodePlan
from lightning_modules.schedules import step_counts


def policy_plan(order_fn, ordering, batch: int, num_steps: int, generator, known=None, order=None,
                per_sample: bool = True, device=None) -> DecodePlan:
    """DecodePlan: the default schedule's counts over the unknown positions; ``order_fn``'s order (one per sample,
    or one shared by the batch), unless an explicit ``order`` is given (then only the counts come from here)."""
    from lightning_modules.ordering import known_first

    base = ordering.default_sample["schedule"]
    N = ordering.num_positions
    mask = None if known is None else known[0].to(device).bool()
    num_known = 0 if mask is None else int(mask.sum())
    counts = step_counts(base, N - num_known, num_steps)
    if order is not None:
        order, num_known = known_first(order, known)
        return DecodePlan(order=order, counts=counts, num_known=num_known)
    rows = batch if per_sample else 1
    order = order_fn(ordering.grid, counts, rows, generator, mask, device).expand(batch, -1)
    return DecodePlan(order=order, counts=counts, num_known=num_known)


def _locality(ordering, batch, num_steps, generator, known=None, order=None, per_sample=True, device=None):
    return policy_plan(locality_order, ordering, batch, num_steps, generator, known, order, per_sample, device)


def _halton(ordering, batch, num_steps, generator, known=None, order=None, per_sample=True, device=None):
    return policy_plan(halton_order, ordering, batch, num_steps, generator, known, order, per_sample, device)


ORDER_POLICIES = {LOCALITY: _locality, HALTON: _halton}
