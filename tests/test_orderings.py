"""Invariants every ordering must keep: causality in its own order, KV-cache decoding == the training forward,
every position generated exactly once, deterministic sampling, declared capabilities true, RAR's schedule,
RAR at r=0 == raster. Parametrised over the registry (conftest.VALID), so a new ordering is covered unedited."""
from __future__ import annotations

import pytest
import torch

from conftest import VALID, make_module
from lightning_modules.sampling import generate

N, V = 16, 11


def batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, N), generator=g), torch.randint(0, 5, (B,), generator=g)


def orders(B, seed=1):
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed)).argsort(-1)


def logits_by_order_index(m, codes, labels, order):
    """Training forward; logits [B, N, V] where index i predicts the token at order[:, i]."""
    seq, targets = m.ordering.train_inputs(codes, labels, 0, None, order=order)
    with torch.no_grad():
        return m.backbone(seq)


def caps(m):
    return m.ordering.capabilities


@pytest.mark.parametrize("variant,flavour", VALID)
def test_causal_in_its_own_training_order(variant, flavour):
    m = make_module(variant, flavour)
    codes, labels = batch()
    order = m.ordering.train_order(3, 0, torch.Generator().manual_seed(1))  # [3, N], the order it trains in
    base = logits_by_order_index(m, codes, labels, order)
    for k in (0, 5, N - 2):
        changed = codes.clone()
        rows = torch.arange(3)
        changed[rows, order[:, k]] = (codes[rows, order[:, k]] + 1) % V  # the token decoded k-th
        new = logits_by_order_index(m, changed, labels, order)
        # targets at order index <= k never see it ...
        assert torch.equal(new[:, : k + 1], base[:, : k + 1]), f"{variant}: logit depends on a later token"
        # ... and the next target does (so this test can fail)
        assert (new[:, k + 1] - base[:, k + 1]).abs().max() > 1e-4


def decode_logits(m, codes, labels, order, num_steps, mode="official"):
    """Sampler driven to emit ``codes``: returns per-step records (no CFG: scale 1 keeps the batch single)."""
    rec = []
    settings = m.sample_settings(num_steps=num_steps, cfg_scale=1.0, mode=mode)
    out = generate(m, labels, settings, None, draw=lambda logits, pos: torch.gather(codes, 1, pos),
                   recorder=rec.append, order=order)
    assert torch.equal(out, codes)
    return rec


@pytest.mark.parametrize("variant,flavour", VALID)
def test_kv_cache_decode_equals_full_forward(variant, flavour):
    m = make_module(variant, flavour)
    codes, labels = batch()
    # the order the ordering itself decodes in (per sample or one per batch, fixed scans their scan)
    order = m.ordering.decode_plan(3, N, "one_per_step", torch.Generator().manual_seed(1)).order
    full = logits_by_order_index(m, codes, labels, order)
    rec = decode_logits(m, codes, labels, order, N)  # one token per step
    for t, r in enumerate(rec):
        assert (r["logits_cond"][:, 0] - full[:, t]).abs().max() <= 1e-5, f"{variant} step {t}"


def test_randar_overwrite_steps_match_training_context():
    """Multi-token steps: the first query of each step reads cache rows written by the overwrite choreography
    and must equal the training forward exactly (later queries see their step-mates: the official quirk)."""
    m = make_module("randar")
    codes, labels = batch()
    order = orders(3)
    full = logits_by_order_index(m, codes, labels, order)
    rec = decode_logits(m, codes, labels, order, 5)
    done = 0
    for r in rec:
        n = r["positions"].shape[1]
        assert (r["logits_cond"][:, 0] - full[:, done]).abs().max() <= 1e-5
        if n > 1:
            assert (r["logits_cond"][:, 1:] - full[:, done + 1: done + n]).abs().max() > 1e-4
        done += n


@pytest.mark.parametrize("variant,flavour", VALID)
@pytest.mark.parametrize("steps", [1, 2, 7, N])
def test_every_position_generated_exactly_once(variant, flavour, steps):
    m = make_module(variant, flavour)
    if not caps(m).parallel and steps != N:
        with pytest.raises(ValueError, match="sample"):  # one token per step: a clear error, not a wrong image
            generate(m, torch.tensor([0]), m.sample_settings(num_steps=steps), torch.Generator().manual_seed(0))
        return
    rec = []
    labels = torch.tensor([0, 1, 2])
    out = generate(m, labels, m.sample_settings(num_steps=steps, cfg_scale=3.0), torch.Generator().manual_seed(0),
                   recorder=rec.append)
    assert len(rec) == steps
    positions = torch.cat([r["positions"] for r in rec], 1)  # [B, N]
    assert torch.equal(positions.sort(1).values, torch.arange(N).expand(3, -1))
    assert sum(r["positions"].shape[1] for r in rec) == N
    assert ((out >= 0) & (out < V)).all()


@pytest.mark.parametrize("variant,flavour", VALID)
def test_same_seed_same_samples(variant, flavour):
    m = make_module(variant, flavour)
    labels = torch.tensor([0, 3])
    a = m.sample_codes(labels, seed=7, cfg_scale=2.0)
    b = m.sample_codes(labels, seed=7, cfg_scale=2.0)
    c = m.sample_codes(labels, seed=8, cfg_scale=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 4, 4) and ((a >= 0) & (a < V)).all()


def test_rar_ratio_endpoints_and_midpoint():
    m = make_module("rar", rar_anneal_start=0.5, rar_anneal_end=0.75)  # max_steps = 100
    assert [m.ordering.random_ratio(s) for s in (0, 50, 62, 75, 100)] == [1.0, 1.0, pytest.approx(0.52), 0.0, 0.0]
    assert m.ordering.random_ratio(int(62.5 * 2) // 2) == pytest.approx(0.52)


def test_rar_draws_random_orders_only_while_r_positive():
    m = make_module("rar", rar_anneal_start=0.5, rar_anneal_end=0.75)
    g = torch.Generator().manual_seed(0)
    early = m.ordering.train_order(64, 0, g)
    late = m.ordering.train_order(64, 90, g)
    assert (early != torch.arange(N)).any(1).float().mean() > 0.9
    assert torch.equal(late, torch.arange(N).expand(64, -1))


def test_rar_at_r0_is_exactly_the_raster_objective():
    rar = make_module("rar", rar_anneal_start=0.0, rar_anneal_end=0.0)
    raster = make_module("raster")
    with torch.no_grad():
        rar.backbone.target_embed.weight.zero_()  # the only extra parameter of RAR on the llama flavour
        missing = raster.backbone.load_state_dict(rar.backbone.state_dict(), strict=False)
    assert missing.unexpected_keys == ["target_embed.weight"] and not missing.missing_keys
    codes, labels = batch(8)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with torch.no_grad():
        l_rar = rar.loss_on(codes, labels, 10, g1)
        l_raster = raster.loss_on(codes, labels, 10, g2)
    assert l_rar.item() == l_raster.item()


def test_consistent_mode_hides_step_mates():
    m = make_module("randar")
    codes, labels = batch()
    order = orders(3)
    official = decode_logits(m, codes, labels, order, 3, "official")
    consistent = decode_logits(m, codes, labels, order, 3, "consistent")
    last = -1
    assert torch.equal(official[last]["logits_cond"][:, 0], consistent[last]["logits_cond"][:, 0])
    assert (official[last]["logits_cond"][:, 1:] - consistent[last]["logits_cond"][:, 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("variant,flavour", VALID)
def test_declared_capabilities_match_what_the_ordering_does(variant, flavour):
    m = make_module(variant, flavour)
    c, g = caps(m), torch.Generator().manual_seed(0)
    # any_order <=> a known position is decoded first (the last raster position: only a reordering moves it)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[-1] = True
    known = (mask, torch.zeros(1, N, dtype=torch.long))
    steps = N - 1 if c.any_order else N  # any-order orderings decode only the unknown positions
    plan = m.ordering.decode_plan(1, steps, m.sample_settings().schedule, g, known)
    assert (plan.num_known == 1 and int(plan.order[0, 0]) == N - 1) == c.any_order
    # every declared schedule decodes a whole image (order policies included); a parallel one in fewer steps
    for schedule in c.schedules:
        steps = 5 if c.parallel and schedule != "one_per_step" else N
        out = generate(m, torch.tensor([0, 1]), m.sample_settings(schedule=schedule, num_steps=steps), g)
        assert ((out >= 0) & (out < V)).all(), schedule
    # per_sample_orders: two samples of one batch get different orders (or never, for one order per batch)
    if c.any_order:
        order = m.ordering.decode_plan(4, N, "one_per_step", g).order
        assert (not torch.equal(order[0], order[1])) == c.per_sample_orders
