"""The ordering refactor (plug-in orderings) must be behaviour-preserving: every debug arm's loss curve, final
weights and fixed-seed sampled codes equal, bit for bit, what was recorded before it (tests/frozen_behaviour.py)."""
from __future__ import annotations

import json

import pytest

from frozen_behaviour import FROZEN, compute


@pytest.fixture(scope="module")
def now(tmp_path_factory):
    return compute(str(tmp_path_factory.mktemp("frozen")))


@pytest.fixture(scope="module")
def frozen():
    with open(FROZEN) as f:
        return json.load(f)


@pytest.mark.slow
def test_loss_curves_weights_and_codes_are_bit_identical(now, frozen):
    assert set(frozen) <= set(now), f"arms missing now: {sorted(set(frozen) - set(now))}"
    for arm, want in frozen.items():
        got = now[arm]
        assert got["losses"] == want["losses"], f"{arm}: loss curve changed"
        assert got["weight_sum"] == want["weight_sum"], f"{arm}: trained weights changed"
        assert got["val_loss"] == want["val_loss"], f"{arm}: validation NLL changed"
        for name, codes in want["codes"].items():
            assert got["codes"].get(name) == codes, f"{arm}: sampled codes ({name}) changed"
        assert set(got["codes"]) == set(want["codes"]), f"{arm}: the samplings it can run changed"
