"""trainer.kernels: the training linears through oneDNN (lightning_modules/nn/onednn.py: ``roar::dense_linear`` with
its own backward, ``OneDnnLinear``) against torch's own — values and all three gradients equal to fp32 rounding,
for every ordering in the registry and both backbones, over several AdamW steps; the module keeps its parameters,
state_dict keys and checkpoints; validation, sampling and autocast keep torch's kernels bit for bit; the op stays
whole under torch.compile; which linears auto swaps; one-line refusals from the config."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_modules.nn.onednn as onednn
from conftest import REPO, VALID, make_module
from lightning_modules.base import make_generator

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(onednn.unavailable("cpu", torch.float32) is not None,
                                 reason=str(onednn.unavailable("cpu", torch.float32)))]
CODES_SEED = 5


def swapped(backbone: nn.Module) -> set[str]:
    return {name for name, mod in backbone.named_modules() if isinstance(mod, onednn.OneDnnLinear)}


def twin_modules(variant, flavour, **model_extra):
    """(aten module, onednn module) with the same weights; every linear of the second runs through oneDNN."""
    ref = make_module(variant, flavour, **model_extra)
    other = make_module(variant, flavour, **model_extra)
    assert onednn.use_for_training(other.backbone, 0) > 0
    other.load_state_dict(ref.state_dict())
    return ref.train(), other.train()


def dense_nodes(loss: torch.Tensor) -> int:
    """How many roar::dense_linear backward nodes the autograd graph of ``loss`` holds."""
    seen, todo, count = set(), [loss.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += "roar_dense_linear" in node.name()
        todo.extend(fn for fn, _ in node.next_functions)
    return count


def batch(m, n=3):
    g = torch.Generator().manual_seed(CODES_SEED)
    codes = torch.randint(0, m.backbone.vocab_size, (n, *m.grid), generator=g).flatten(1)
    return codes, torch.randint(0, m.backbone.num_classes, (n,), generator=g)


@pytest.mark.parametrize("shape,features,bias", [((3, 7, 64), (64, 300), True), ((10, 300), (300, 64), False),
                                                 ((0, 5), (5, 6), True)])
def test_dense_linear_equals_f_linear_with_its_gradients(shape, features, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    lin = nn.Linear(*features, bias=bias)
    inputs = [x, lin.weight] + ([lin.bias] if bias else [])
    ref = F.linear(x, lin.weight, lin.bias)
    out = onednn.dense_linear(x, lin.weight, lin.bias)
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b)
        assert a.is_contiguous()  # what AccumulateGrad and DDP's buckets take without a copy


def test_dense_linear_takes_transposed_inputs_and_passes_torchs_op_checks():
    x = torch.randn(64, 12).t().requires_grad_()  # [12, 64], not contiguous
    w, b = torch.randn(40, 64, requires_grad=True), torch.randn(40, requires_grad=True)
    torch.testing.assert_close(onednn.dense_linear(x, w, b), F.linear(x, w, b))
    args = (torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True),
            torch.randn(16, requires_grad=True))
    torch.library.opcheck(onednn.dense_linear, args)


@pytest.mark.parametrize("variant,flavour", VALID)
def test_onednn_training_follows_aten_over_adamw_steps(variant, flavour):
    """Loss and every gradient equal to fp32 rounding at each of 3 AdamW steps (same seeds, same orders)."""
    ref, other = twin_modules(variant, flavour)
    assert swapped(other.backbone) == {n for n, mod in other.backbone.named_modules() if isinstance(mod, nn.Linear)}
    codes, labels = batch(ref)
    opts = [m.configure_optimizers()["optimizer"] for m in (ref, other)]
    for step in range(3):
        losses, grads = [], []
        for m, opt in zip((ref, other), opts):
            loss = m.loss_on(codes, labels, step, make_generator(step))
            assert (dense_nodes(loss) > 0) == (m is other)  # the oneDNN module trains through the op, the other not
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in m.backbone.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6, msg=f"{variant} step {step}: loss")
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=f"{variant} step {step}: {name}")


def test_the_module_keeps_its_parameters_keys_and_checkpoints():
    ref, other = twin_modules("arpg", "llama")
    params = dict(other.backbone.named_parameters())
    assert params.keys() == dict(ref.backbone.named_parameters()).keys()
    assert other.state_dict().keys() == ref.state_dict().keys()
    again = make_module("arpg", randomize=False)
    again.load_state_dict(other.state_dict(), strict=True)  # an aten module loads a oneDNN run's weights
    assert all(p is params[n] for n, p in other.backbone.named_parameters())  # the class switched, not the modules


def test_without_grad_or_under_autocast_the_linears_are_torchs_bit_for_bit():
    """Validation NLLs, sampling and bf16-mixed give exactly what trainer.kernels=aten gives."""
    ref, other = twin_modules("randar", "llama")
    codes, labels = batch(ref)
    with torch.no_grad():
        a = ref.token_nll(codes, labels, make_generator(0))
        b = other.token_nll(codes, labels, make_generator(0))
    assert torch.equal(a, b)
    assert torch.equal(ref.sample_codes(labels, 3, kernels="aten"), other.sample_codes(labels, 3, kernels="aten"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, _ = ref.logits_on(codes, labels, 0, make_generator(0))
        lb, _ = other.logits_on(codes, labels, 0, make_generator(0))
    assert torch.equal(la, lb)


@pytest.mark.parametrize("variant", ["raster", "arpg"])
def test_the_op_compiles_into_one_graph_with_its_backward(variant):
    # llama: RAR-ViT's forward has data-dependent branches of its own (nn/rar_vit.py), which fullgraph refuses
    _, other = twin_modules(variant, "llama")
    codes, labels = batch(other)
    seq, _ = other.ordering.train_inputs(codes, labels, 0, make_generator(0))
    eager = other.backbone(seq)
    g_eager = torch.autograd.grad(eager.square().mean(), list(other.backbone.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(other.backbone, backend="aot_eager", fullgraph=True)  # a graph break fails here
    out = compiled(seq)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out.square().mean(), list(other.backbone.parameters())), g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_swaps_the_big_linears_and_aten_none(monkeypatch):
    from lightning_modules.variants import build_module

    def module(kernels, **model):
        spec = dict(variant="raster", size="debug", num_classes=5, grid=[4, 4], **model)
        return build_module(spec, {"build": {"kind": "codes", "vocab_size": 11}}, max_steps=10, kernels=kernels)

    assert module("auto").onednn_linears == 0  # a debug model: nothing >= 2^17 weights, every record stays as it was
    assert module("aten", dim=128, ffn_hidden=1024).onednn_linears == 0
    # the 2-rank run of tests/test_scale_callbacks.py (DDP, ZeRO-2/3, offload, every callback) trains through these
    big = module("auto", dim=128, ffn_hidden=1024)
    assert swapped(big.backbone) == {f"layers.{i}.feed_forward.{w}" for i in range(2) for w in ("w1", "w2", "w3")}
    assert module("onednn").onednn_linears == sum(isinstance(m, nn.Linear) for m in big.backbone.modules())
    with pytest.raises(ValueError, match=r"^trainer.kernels: unknown kernels 'mkl'"):
        module("mkl")


@pytest.mark.parametrize("overrides,key", [
    (["trainer.kernels=onednn", "trainer.accelerator=gpu"], "trainer.kernels"),
    (["trainer.kernels=onednn", "trainer.precision=bf16-mixed"], "trainer.kernels"),
    (["trainer.kernels=mkl"], "trainer.kernels"),
])
def test_the_cli_refuses_kernels_it_cannot_run_in_one_line(tmp_path, overrides, key):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "-c", "experiments/configs/debug_raster.yaml",
                           f"out_dir={tmp_path}", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
