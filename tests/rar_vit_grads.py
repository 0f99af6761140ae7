"""Loss and gradients of one RAR-ViT training forward/backward (dropout on, seeded), for the before/after check of
backbone speed edits (tests/test_rar_vit_grads.py). ``python tests/rar_vit_grads.py --write`` rewrites the record."""
from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, "assets", "rar_vit_grads.json")


def loss_and_grads(variant: str = "rar", seed: int = 0) -> dict:
    """debug rar_vit (dropouts 0.1 as configured), batch 3, grid 4x4: loss and every parameter's gradient."""
    sys.path.insert(0, os.path.dirname(HERE))
    from lightning_modules.variants import build_module

    torch.manual_seed(seed)
    m = build_module(dict(variant=variant, flavour="rar_vit", size="debug", num_classes=5, grid=[4, 4]),
                     {"build": {"kind": "codes", "vocab_size": 11}}, optim={"lr": 1e-3}, max_steps=100).train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    codes = torch.randint(0, 11, (3, 16), generator=g)
    labels = torch.randint(0, 5, (3,), generator=g)
    torch.manual_seed(seed + 2)  # the dropout masks
    loss = m.loss_on(codes, labels, 10, m.generator(10))
    loss.backward()
    return {"loss": loss.item(), "grads": {n: summary(p.grad) for n, p in m.backbone.named_parameters()
                                           if p.grad is not None}}


def summary(t: torch.Tensor) -> dict:
    """Exact bits (sha256) for the bit-identity check, and float64 sum / L2 / a fixed random projection for the
    1e-6 one (a full dump of every gradient would be 9 MB)."""
    import hashlib

    x = t.detach().double().flatten()
    w = torch.randn(x.numel(), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return {"sha256": hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest(),
            "sum": x.sum().item(), "l2": x.norm().item(), "proj": (x @ w).item()}


if __name__ == "__main__":
    from kernel_set import kernel_set

    if sys.argv[1:] != ["--write"]:  # the record is the reference: rewrite it only when asked to
        print(f"usage: python {os.path.relpath(__file__)} --write   (rewrites {os.path.relpath(RECORD)})",
              file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(1)
    with open(RECORD, "w") as f:
        # the CPU kernel set decides reduction orders: bit identity is only expected on the same one
        json.dump({**kernel_set(), **{v: loss_and_grads(v) for v in ("raster", "rar")}}, f)
    print(f"wrote {RECORD}")
