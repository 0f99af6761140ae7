"""The class reaches every slot of every ordering, and the class-consistency metric means what it says.

A layout that kept the class away from some slots (a wrong mask, a class slot off row 0 of the cache, a null label
where a real one belongs) fails ``test_every_slot_sees_the_class``; a model that cannot use it fails the training
check: each ordering in the registry trains on data in which the class alone decides the image (one fixed random
template per class), and must explain its first token by the class and reach a low NLL everywhere.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import VALID, make_module

V, C, GRID = 11, 5, (4, 4)
N = GRID[0] * GRID[1]


def templates(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (C, N), generator=torch.Generator().manual_seed(seed))  # [C, N]


@pytest.mark.parametrize("variant,flavour", VALID)
def test_every_ordering_learns_what_the_class_decides(variant, flavour, one_thread):
    torch.manual_seed(0)
    m = make_module(variant, flavour, grid=GRID, vocab=V, num_classes=C, randomize=False).train()
    tmpl = templates()
    opt = torch.optim.AdamW(m.backbone.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for step in range(300):
        labels = torch.randint(0, C, (32,), generator=g)
        loss = m.loss_on(tmpl[labels], labels, step, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    labels = torch.arange(C).repeat(4)
    x = tmpl[labels]
    with torch.no_grad():  # per position in decode order, the same fresh orders for both label sets
        true = m.token_nll(x, labels, torch.Generator().manual_seed(2)).mean(0)  # [N] nats
        wrong = m.token_nll(x, (labels + 1) % C, torch.Generator().manual_seed(2)).mean(0)
    # the first token of the order has no context: only the class can explain it
    assert float(wrong[0] - true[0]) > 0.5, f"{variant}/{flavour}: the first prediction ignores the class"
    assert float(true.mean()) < 0.25 * math.log(V), f"{variant}/{flavour}: did not learn the class templates"


@pytest.mark.parametrize("variant,flavour", VALID)
def test_every_slot_sees_the_class(variant, flavour):
    """Teacher-forced on the same tokens and order, another label changes the logits at every position."""
    m = make_module(variant, flavour)
    codes = torch.randint(0, 11, (2, N), generator=torch.Generator().manual_seed(0))
    order = m.ordering.train_order(1, 0, torch.Generator().manual_seed(1)).expand(2, -1)
    with torch.no_grad():
        a = m.backbone(m.ordering.train_inputs(codes, torch.tensor([0, 0]), 0, None, order=order)[0])
        b = m.backbone(m.ordering.train_inputs(codes, torch.tensor([1, 1]), 0, None, order=order)[0])
    changed = (a - b).abs().amax(-1).amin(0)  # [N]: the smallest change per slot over the batch
    assert float(changed.min()) > 1e-4, f"{variant}/{flavour}: slots blind to the class " \
                                        f"{(changed <= 1e-4).nonzero().flatten().tolist()}"


def test_arpg_first_query_cannot_see_its_position_as_released():
    """ARPG as released (and reproduced to the logits here): the class key's RoPE row is zero, so its attention
    score is 0, and a query's own position enters only through RoPE scores against token keys. The first query
    sees the class key alone, so its output cannot depend on the position it predicts: it can only learn the
    class's token distribution over all positions. (RandAR's position tokens and the target-aware embedding of
    RAR / sigma-GPT carry the position in the residual stream and do not have this property.)"""
    m = make_module("arpg", grid=GRID, vocab=V, num_classes=C)
    labels = torch.tensor([0, 0])
    codes = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    order = torch.stack([torch.arange(N), torch.arange(N).flip(0)])  # first targets: position 0 vs position N-1
    with torch.no_grad():
        seq, _ = m.ordering.train_inputs(codes, labels, 0, None, order=order)
        logits = m.backbone(seq)  # [2, N, V]
    assert torch.allclose(logits[0, 0], logits[1, 0], atol=1e-6)  # query 0: the same for either target
    assert not torch.allclose(logits[0, 1], logits[1, 1], atol=1e-4)  # query 1 sees a token key: it differs


def test_class_consistency_is_one_with_the_labels_and_chance_without():
    from lightning_modules.metrics.consistency import class_consistency

    class Oracle(torch.nn.Module):  # a "classifier" that reads the label painted into pixel (0, 0)
        num_classes = 10

        def features_and_logits(self, images):
            return images.float().flatten(1), torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 10).float()

    labels = torch.arange(1000) % 10
    images = torch.zeros(1000, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    assert class_consistency(Oracle(), images, labels) == 1.0
    shuffled = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    assert abs(class_consistency(Oracle(), images, shuffled) - 0.1) < 0.03
    with pytest.raises(ValueError, match="labels"):
        class_consistency(Oracle(), images, labels[:10])
