"""Backbone speed edits keep the RAR-ViT training numerics: loss and every parameter's gradient of one seeded
forward/backward (dropout on) equal the record taken before the edits (tests/rar_vit_grads.py): bit for bit, or,
where an edit reorders a reduction, within 1e-6 (relative to the gradient's scale). Bit-identical is what holds now:
tests/test_frozen_behaviour.py pins trained rar_vit weights bit for bit, so an edit that is only close fails there."""
from __future__ import annotations

import json

import pytest
import torch

from rar_vit_grads import RECORD, loss_and_grads


@pytest.fixture(scope="module")
def record():
    with open(RECORD) as f:
        return json.load(f)


@pytest.mark.parametrize("variant", ["raster", "rar"])
def test_rar_vit_loss_and_gradients_equal_the_record(variant, record, one_thread):
    want, got = record[variant], loss_and_grads(variant)
    assert abs(got["loss"] - want["loss"]) <= 1e-6 * abs(want["loss"])
    assert set(got["grads"]) == set(want["grads"])
    differ = []
    for name, w in want["grads"].items():
        g = got["grads"][name]
        if g["sha256"] == w["sha256"]:
            continue
        differ.append(name)
        scale = max(w["l2"], 1e-12)  # sum and projection are compared against the gradient's L2 scale
        for stat in ("sum", "l2", "proj"):
            assert abs(g[stat] - w[stat]) <= 1e-6 * scale, f"{variant}: {name}.grad {stat} moved"
    assert got["loss"] == want["loss"] and not differ, f"{variant}: not bit-identical: {differ}"
