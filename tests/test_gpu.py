"""GPU-only checks (`make test-gpu` = pytest -m gpu; skipped without CUDA): the training forward on CUDA against
the CPU, bf16 autocast and bf16 sampling, the flash SDPA kernel on the shapes a raster decode produces, and
the fast decode step under CUDA graphs against the eager loop (IEEE fp32 and TF32), the device memory a training
sampling event gives back and a dropped module's fast-path memory, Lightning's stock DeepSpeed strategy and
bf16-mixed training for real, with every training callback on.

ROAR_TEST_DEVICE=cpu runs the device-independent parts on the CPU (a check of the test code itself on machines
without a GPU; the DeepSpeed/Lightning GPU runs stay skipped there).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import EVERY_CALLBACK, REPO, VALID, make_module, subprocess_env
from lightning_modules.sampling import generate

DEVICE = os.environ.get("ROAR_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
N, V = 16, 11


def inputs(m, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, labels = torch.randint(0, V, (B, N), generator=g), torch.randint(0, 5, (B,), generator=g)
    order = torch.rand(B, N, generator=g).argsort(-1)
    if not m.ordering.capabilities.any_order:  # fixed scans (and RAR at the end of training) decode their scan
        order = m.ordering.decode_plan(B, N, "one_per_step", None).order
    return codes, labels, order


def forward(m, codes, labels, order, device):
    seq, _ = m.ordering.train_inputs(codes.to(device), labels.to(device), 0, None, order=order.to(device))
    with torch.no_grad():
        return m.backbone(seq).float()


@pytest.mark.parametrize("variant,flavour", VALID)
def test_device_forward_matches_cpu_and_bf16_autocast_stays_close(variant, flavour):
    m = make_module(variant, flavour)
    codes, labels, order = inputs(m)
    ref = forward(m, codes, labels, order, "cpu")
    m.to(DEVICE)
    out = forward(m, codes, labels, order, DEVICE).cpu()
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()  # TF32 is off by default for matmuls
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        low = forward(m, codes, labels, order, DEVICE).cpu()
    assert torch.isfinite(low).all() and (low - ref).abs().mean() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("variant,flavour", VALID)
def test_bf16_sampling_on_device_generates_every_position_once(variant, flavour):
    m = make_module(variant, flavour).to(DEVICE)
    labels = torch.tensor([0, 1, 2, 4], device=DEVICE)
    steps = []
    steps_ = 5 if m.ordering.capabilities.parallel else N
    settings = m.sample_settings(num_steps=steps_, cfg_scale=3.0, precision="bf16")
    codes = generate(m, labels, settings, torch.Generator(DEVICE).manual_seed(0), recorder=steps.append)
    assert codes.shape == (4, N) and codes.device.type == torch.device(DEVICE).type
    assert int(codes.min()) >= 0 and int(codes.max()) < V
    seen = torch.cat([s["positions"] for s in steps], 1).sort(-1).values.cpu()
    assert torch.equal(seen, torch.arange(N).expand(4, -1))


@pytest.mark.parametrize("variant", ["raster", "rar"])
def test_one_token_decode_steps_run_on_the_flash_kernel(variant):
    """Every raster/RAR decode step feeds one slot, which attention runs unmasked (CacheSet.prepare), so the whole
    bf16 generation works with SDPA restricted to the flash kernel (an explicit mask would rule it out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = make_module(variant).to(DEVICE)
    labels = torch.tensor([0, 3], device=DEVICE)
    # the eager loop: a compiled step (sample.compile=auto is on with CUDA) would not re-trace inside sdpa_kernel
    settings = m.sample_settings(cfg_scale=2.0, precision="bf16", compile="off")
    expected = generate(m, labels, settings, torch.Generator(DEVICE).manual_seed(0))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = generate(m, labels, settings, torch.Generator(DEVICE).manual_seed(0))
    assert flash.shape == expected.shape and (flash == expected).float().mean() > 0.9  # same path up to bf16 ties


@needs_cuda
@pytest.mark.parametrize("variant", ["raster", "arpg"])
def test_cuda_graph_decode_gives_the_eager_loops_tokens(variant):
    """sample.compile=on with CUDA: the static step under torch.compile's reduce-overhead mode (CUDA graphs; the
    in-place cache and token writes on static addresses) draws the same tokens for the same seed as the eager loop.
    CUDA graphs go through three phases per step shape: warm-up (the compiled code, no graph), recording, replay;
    every compiled call starts a new cudagraph-tree iteration (no backward is pending). ARPG's steps each have their
    own shape, so its third generation is its first replay: three seeds. fp32 without TF32 (sample.tf32=false),
    multinomial: the Exp(1) noise comes from the same CUDA generator stream on both paths
    (lightning_modules/fast_decode.py). With TF32 (the default) both paths round their matmuls to TF32, and the
    static step's bucketed key count reduces attention in another order: nearly all tokens agree. Raster: one-slot
    steps; ARPG: several position queries per step over the shared K/V."""
    m = make_module(variant).to("cuda")
    labels = torch.tensor([0, 3, 4], device="cuda")
    steps = 4 if m.ordering.capabilities.parallel else N
    for tf32 in (False, True):
        for seed in (0, 1, 2):
            codes = {c: generate(m, labels, m.sample_settings(num_steps=steps, cfg_scale=2.5, compile=c, tf32=tf32),
                                 torch.Generator("cuda").manual_seed(seed)) for c in ("off", "on")}
            if not tf32:
                assert torch.equal(codes["on"], codes["off"]), f"{variant}, seed {seed}: the CUDA-graph step drew " \
                                                               f"other tokens"
            else:
                assert (codes["on"] == codes["off"]).float().mean() > 0.9, f"{variant}, seed {seed}, TF32"


@needs_cuda
def test_a_training_sampling_event_gives_the_device_its_memory_back():
    """What a sampling callback allocates (callbacks/gathered.py::sampling_module, sample.compile=auto) is free
    again for the training step after it: no KV cache, CUDA graph or bf16 copy stays behind. The control
    (the static fast step outside an event, which keeps its per-configuration buffers) shows the check sees a hold."""
    import lightning_modules.sampling as sampling
    from lightning_modules.callbacks.gathered import sampling_module

    m = make_module("arpg", grid=(16, 16), vocab=1024, dim=256).to("cuda")
    labels = torch.tensor([0, 3, 4], device="cuda")
    m.sample_codes(labels, seed=0, num_steps=4, cfg_scale=2.0, precision="bf16", compile="off")  # cuBLAS workspaces
    sampling._SAMPLING_COPIES.pop(m.backbone, None)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with sampling_module(None, m) as (module, _):
        module.sample_codes(labels, seed=0, num_steps=4, cfg_scale=2.0, precision="bf16")
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    assert held < 2**20, f"a training sampling event left {held / 2**20:.1f} MB on the device"
    m.sample_codes(labels, seed=0, num_steps=4, cfg_scale=2.0, compile="static")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before > 4 * 2**20  # K/V of 6 rows x 257 slots x 2 layers x 256, fp32


@needs_cuda
def test_an_evaluated_arm_gives_the_device_its_memory_back_once_dropped():
    """ablate and study sample arm after arm in one process with sample.compile=auto (CUDA graphs outside training):
    once an arm's module is dropped, its KV cache, buffers and CUDA graphs (cudagraph trees' memory pool) must be
    free for the next arm. The first arm sets the baseline (what stays per process: cuBLAS workspaces of the capture
    stream, the cudagraph-tree manager); the second must leave nothing on top of it. The control: while the module
    lives, the fast path holds its per-configuration state."""
    import gc

    labels = torch.tensor([0, 3, 4], device="cuda")

    def arm():
        m = make_module("arpg", grid=(16, 16), vocab=1024, dim=256).to("cuda")
        for seed in (0, 1, 2):  # warm-up, recording, replay
            m.sample_codes(labels, seed=seed, num_steps=4, cfg_scale=2.0)
        torch.cuda.synchronize()
        return m

    arm()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    m = arm()
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    assert torch.cuda.memory_allocated() - base - weights > 4 * 2**20  # the cache: 6 rows x 257 x 2 layers x 256
    del m
    gc.collect()
    torch.cuda.synchronize()
    left = torch.cuda.memory_allocated() - base
    assert left < 2**20, f"a dropped module left {left / 2**20:.1f} MB on the device"


def train_run(tmp_path, name: str, *overrides: str) -> dict:
    """4 steps on one GPU with every training callback on (grid, order map, FID, EMA at steps 2 and 4)."""
    cmd = [sys.executable, "-m", "experiments.train", "-c", "experiments/configs/debug_raster.yaml",
           "trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_steps=4", "trainer.global_batch_size=8",
           "trainer.val_every_steps=1000", "trainer.ckpt_every_steps=1000", "trainer.limit_val_batches=1",
           *EVERY_CALLBACK, "resume=never", f"out_dir={tmp_path}", f"name={name}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(REPO), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(os.path.join(tmp_path, name, "metrics.json")) as f:
        return json.load(f)


@needs_cuda
def test_bf16_mixed_training_on_one_gpu(tmp_path):
    metrics = train_run(tmp_path, "bf16", "trainer.precision=bf16-mixed", "sample.precision=bf16")
    assert metrics["steps"] == 4 and 0 < metrics["val_nll_bits"] < 20
    assert math.isfinite(metrics["val/fid30"]) and metrics["fid_eval"]["ema"] is True  # EMA weights sampled


@needs_cuda
@pytest.mark.parametrize("stage", [2, 3])
def test_stock_deepspeed_strategy_trains_on_one_gpu(tmp_path, stage):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from experiments.config import load_config
    from experiments.strategies import deepspeed_strategy

    cfg = load_config([os.path.join(REPO, "experiments/configs/debug_raster.yaml")],
                      ["trainer.accelerator=gpu", f"trainer.strategy=deepspeed_stage_{stage}"])
    assert type(deepspeed_strategy(cfg)) is DeepSpeedStrategy  # the stock class, not the CPU subclass
    metrics = train_run(tmp_path, f"zero{stage}", f"trainer.strategy=deepspeed_stage_{stage}",
                        "trainer.precision=bf16-mixed")
    assert metrics["steps"] == 4 and 0 < metrics["val_nll_bits"] < 20
    assert math.isfinite(metrics["val/fid30"]) and metrics["fid_eval"]["ema"] is True  # EMA weights sampled
