"""The benchmark suite: the CLI runs end to end and writes its JSON + Markdown; the no-KV-cache reference sampler
reproduces the cached sampler (a real check of the cache); FLOP counting matches a hand count and an independent
count of the matmuls and attention pairs actually executed. No timing assertions."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import VALID, make_module
from experiments.bench import main as bench_main
from experiments.bench_sample import sample_nocache
from experiments.bench_train import forward_flops
from lightning_modules.base import make_generator
from lightning_modules.nn import attention
from lightning_modules.sampling import generate


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_all_sections_write_json_and_markdown(tmp_path):
    out = str(tmp_path / "bench" / "all.json")
    rc = bench_main(["all", "--size", "debug", "--grid", "4", "--vocab", "32", "--repeat", "1", "--warmup", "0",
                     "--peak-sizes", "64", "--no-sweep", "--batch", "2", "--draws", "multinomial", "--threads", "1",
                     "--precisions", "fp32,bf16",
                     "--data-workers", "0", "--data-batches", "1", "--data-batch-size", "4", "--out", out])
    assert rc == 0
    res = json.load(open(out))
    assert {"machine", "peak_before", "peak_after", "train", "sample", "data"} <= set(res)
    assert {"cpu", "torch", "torch_threads", "load_average"} <= set(res["machine"])
    assert {"gflops", "per_n", "gflops_per_cpu_s"} <= set(res["peak_before"]["matmul_peak"]["fp32"])
    train = res["train"]["results"]
    from lightning_modules.variants import variant_names

    assert {r["variant"] for r in train} == set(variant_names())  # every registered ordering, none named here
    for r in train:
        assert {"step_s", "tokens_per_s", "gflop_per_step", "gflops", "mfu", "peak_mem_mb", "state_mb"} <= set(r)
        assert r["gflop_per_step"] > 0 and r["tokens_per_s"] > 0
    sample = res["sample"]["results"]
    assert {r["variant"] for r in sample} == set(variant_names())
    assert {True, False} == {r["kv_cache"] for r in sample} and {1.0, 4.0} == {r["cfg"] for r in sample}
    assert {(r["variant"], r["steps"]) for r in sample} >= {("raster", 16), ("randar", 6), ("arpg", 4), ("arpg", 2)}
    assert all(r["images_per_s"] > 0 and "speedup_vs_raster" in r for r in sample)
    assert res["sample"]["targets"]
    cached = [r for r in sample if r["kv_cache"]]
    assert {r["precision"] for r in cached} == {"fp32", "bf16"}  # each compared with raster at its own precision
    assert any(", bf16, " in k for k in res["sample"]["targets"])  # each target row names its precision
    assert res["data"]["results"][0]["workers"] == 0 and res["data"]["results"][0]["images_per_s"] > 0
    md = open(str(tmp_path / "bench" / "all.md")).read()
    for heading in ("# roar benchmark (all)", "## Training step", "## Sampling", "## Data loading", "matmul peak"):
        assert heading in md


def test_peak_is_measured_only_for_the_dtypes_the_run_times(tmp_path, monkeypatch):
    """An fp32 bench must not measure a bf16 peak: on an AVX2-only CPU that one matmul at n = 4096 took minutes."""
    import experiments.bench as bench

    asked, real = [], bench.matmul_gflops

    def recording(device, dtypes, *rest):
        asked.append(tuple(dtypes))
        return real(device, dtypes, *rest)

    monkeypatch.setattr(bench, "matmul_gflops", recording)
    common = ["--size", "debug", "--grid", "4", "--vocab", "32", "--repeat", "1", "--warmup", "0", "--peak-sizes",
              "64", "--threads", "1", "--variants", "raster"]
    assert bench_main(["train", *common, "--out", str(tmp_path / "t.json")]) == 0
    assert asked == [("fp32",), ("fp32",)]  # before and after the timed section
    assert "bf16" not in json.load(open(tmp_path / "t.json"))["peak_before"]["matmul_peak"]
    asked.clear()
    assert bench_main(["train", *common, "--dtype", "bf16", "--out", str(tmp_path / "b.json")]) == 0
    assert asked == [("bf16",), ("bf16",)]
    row = json.load(open(tmp_path / "b.json"))["train"]["results"][0]
    assert row["dtype"] == "bf16" and "mfu" in row  # the MFU still finds its peak


def test_cli_times_each_kernel_setting_against_the_eager_reference(tmp_path):
    """--kernels and --sample-compile are axes: every fast row is compared with compile off + aten (the reference
    eager loop), and the matmul peak is the best library's (oneDNN beside torch's matmul on a CPU)."""
    from lightning_modules.nn.onednn import unavailable

    if unavailable("cpu", torch.float32):
        pytest.skip(unavailable("cpu", torch.float32))
    out = str(tmp_path / "k.json")
    assert bench_main(["sample", "--size", "debug", "--grid", "4", "--vocab", "32", "--repeat", "1", "--warmup", "0",
                       "--peak-sizes", "64", "--no-sweep", "--batch", "1", "--draws", "multinomial", "--threads", "1",
                       "--cfgs", "4", "--variants", "raster,arpg", "--kernels", "aten,onednn",
                       "--sample-compile", "off,static", "--out", out]) == 0
    res = json.load(open(out))
    peak = res["peak_before"]["matmul_peak"]["fp32"]
    assert set(peak["by_library"]) == {"aten", "onednn"} and peak["gflops"] == max(peak["by_library"].values())
    cached = [r for r in res["sample"]["results"] if r["kv_cache"]]
    assert {(r["compile"], r["kernels"]) for r in cached} == {(c, k) for c in ("off", "static")
                                                              for k in ("aten", "onednn")}
    for r in cached:
        reference = (r["compile"], r["kernels"]) == ("off", "aten")
        assert ("speedup_vs_eager" in r) != reference, r  # every setting but the reference itself
        assert "speedup_vs_raster" in r  # against raster at the same compile and kernels
    assert any("kernels onednn vs eager" in k for k in res["sample"]["targets"])
    bandwidth = max(res[k]["stream"]["gbps"] for k in ("peak_before", "peak_after"))
    assert bandwidth > 0 and "sum" in res["peak_before"]["stream"]["by_kernel"]
    for r in cached:  # the roofline floor: the slower of the FLOPs at the peak and the reads at the bandwidth
        floor = max(r["gflop"] / r["peak_gflops"], r["traffic_gb"] / bandwidth)
        assert r["floor_s"] == pytest.approx(floor, abs=1e-4) and r["of_floor"] == pytest.approx(
            r["floor_s"] / r["seconds"], abs=2e-3)
    assert " kernels |" in open(str(tmp_path / "k.md")).read()  # a column of the summary table



def test_cli_times_each_training_kernel_setting(tmp_path):
    """--kernels is an axis of the training bench too: one row per (variant, trainer.kernels), each saying how many
    linears ran through oneDNN (onednn: all of them; aten: none)."""
    from lightning_modules.nn.onednn import unavailable

    if unavailable("cpu", torch.float32):
        pytest.skip(unavailable("cpu", torch.float32))
    out = str(tmp_path / "t.json")
    assert bench_main(["train", "--size", "debug", "--grid", "4", "--vocab", "32", "--repeat", "1", "--warmup", "0",
                       "--peak-sizes", "64", "--threads", "1", "--variants", "raster,arpg", "--kernels", "aten,onednn",
                       "--out", out]) == 0
    rows = json.load(open(out))["train"]["results"]
    assert sorted((r["variant"], r["kernels"]) for r in rows) == [("arpg", "aten"), ("arpg", "onednn"),
                                                                   ("raster", "aten"), ("raster", "onednn")]
    for r in rows:
        assert (r["onednn_linears"] > 0) == (r["kernels"] == "onednn") and r["gflop_per_step"] > 0
    assert " kernels |" in open(str(tmp_path / "t.md")).read()

# ---------------------------------------------------------------------------------------------- no-cache reference
@pytest.mark.parametrize("variant,flavour", VALID)
def test_nocache_reference_matches_cached_sampler(variant, flavour):
    m = make_module(variant, flavour)
    labels = torch.tensor([0, 3, 4])
    # one-token-per-step orderings: N steps (mode changes nothing); the multi-token orderings run both modes
    plan = ([("official", 3), ("official", 16), ("consistent", 5)] if m.ordering.capabilities.parallel
            else [("official", 16)])
    for mode, steps in plan:
        s = m.sample_settings(num_steps=steps, cfg_scale=2.5, mode=mode)
        rec_a, rec_b = [], []
        a = generate(m, labels, s, make_generator(11), recorder=rec_a.append)
        b = sample_nocache(m, labels, s, make_generator(11), recorder=rec_b.append)
        assert torch.equal(a, b), f"{variant}/{flavour} {mode} {steps} steps: tokens differ"
        for x, y in zip(rec_a, rec_b):
            torch.testing.assert_close(x["logits_cfg"], y["logits_cfg"], atol=1e-4, rtol=1e-5)


def test_nocache_reference_catches_a_broken_cache(monkeypatch):
    """A cache whose first write of a row wins (no overwrite) breaks RandAR's choreography: the reference notices."""
    m = make_module("randar")
    labels = torch.tensor([1, 2])
    s = m.sample_settings(num_steps=4, cfg_scale=1.0)
    forced = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(0))
    draw = lambda logits, pos: torch.gather(forced, 1, pos)  # noqa: E731  same tokens both ways

    def first_write_wins(self, rows, k, v, length=None):
        seen = getattr(self, "seen", torch.zeros(self.k.shape[2], dtype=torch.bool))
        new = ~seen[rows]
        self.k.index_copy_(2, rows[new], k[:, :, new])
        self.v.index_copy_(2, rows[new], v[:, :, new])
        self.seen = seen.index_fill(0, rows, True)
        self.length = int(rows.max()) + 1
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    monkeypatch.setattr(attention.KVCache, "write", first_write_wins)
    rec_a, rec_b = [], []
    generate(m, labels, s, None, draw=draw, recorder=rec_a.append)
    sample_nocache(m, labels, s, None, draw=draw, recorder=rec_b.append)
    worst = max((x["logits_cfg"] - y["logits_cfg"]).abs().max().item() for x, y in zip(rec_a, rec_b))
    assert worst > 1e-2


# ---------------------------------------------------------------------------------------------- FLOPs
def test_flops_hand_count_tiny_llama_raster():
    """debug llama: D=64, 2 layers, SwiGLU hidden 256 (2*4*64/3 rounded up to 256), grid 4x4, vocab 11."""
    m = make_module("raster")
    B, N, D, V, H = 3, 16, 64, 11, 256
    seq, _ = m.ordering.train_inputs(torch.zeros(B, N, dtype=torch.long), torch.zeros(B, dtype=torch.long), 0, None)
    per_layer = 3 * D * D + D * D + 3 * D * H  # wqkv + wo + w1, w3, w2 = 65536
    body = 2 * (2 * per_layer) * B * N
    attn = 2 * 4 * D * B * (N * (N + 1) // 2)  # causal: 136 visible pairs per sample and layer
    head = 2 * D * V * B * N
    f = forward_flops(m.backbone, seq)
    assert (f["body"], f["attention"], f["head"]) == (body, attn, head)
    assert f["total"] == 4_286_464 * B


@pytest.mark.parametrize("variant,flavour", VALID)
def test_flops_match_executed_matmuls_and_attention(variant, flavour, monkeypatch):
    """Independent count: every nn.Linear call (2 * in * out * rows) and every SDPA call's visible pairs."""
    m = make_module(variant, flavour)
    codes = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(0))
    seq, _ = m.ordering.train_inputs(codes, torch.tensor([0, 1]), 0, make_generator(0),
                            order=torch.rand(2, 16, generator=torch.Generator().manual_seed(1)).argsort(-1))
    counted = {"linear": 0, "attention": 0}

    def hook(mod, inp, out):
        counted["linear"] += 2 * mod.in_features * mod.out_features * (inp[0].numel() // mod.in_features)

    handles = [mod.register_forward_hook(hook) for mod in m.backbone.modules() if isinstance(mod, torch.nn.Linear)]
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
        B, H, Lq, hd = q.shape
        Lk = k.shape[2]
        if attn_mask is not None:
            pairs = int(attn_mask.expand(B, 1, Lq, Lk).sum())
        elif is_causal:
            pairs = B * int(torch.ones(Lq, Lk).tril().sum())
        else:
            pairs = B * Lq * Lk
        counted["attention"] += 4 * H * hd * pairs
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        m.backbone(seq)
    for h in handles:
        h.remove()
    f = forward_flops(m.backbone, seq)
    assert f["body"] + f["head"] == counted["linear"]
    assert f["attention"] == counted["attention"]


# ---------------------------------------------------------------------------------------------- sampling FLOPs
def _generation_flop_counts(m, steps, mode, cfg):
    """FlopCounterMode over one eager generate call (math SDPA, so attention shows as bmm): mm/addmm = the
    linears, bmm = attention over every (query, key) pair of the visible cache, masked pairs included."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    m.requires_grad_(False)  # FlopCounterMode's module tracker trips over leaves that require grad under no_grad
    s = m.sample_settings(num_steps=steps, cfg_scale=cfg, mode=mode)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        generate(m, torch.tensor([0, 1, 2]), s, make_generator(0))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    linear = sum(v for k, v in counts.items() if k in ("aten.mm", "aten.addmm"))
    return s, linear, counts.get("aten.bmm", 0)


@pytest.mark.parametrize("variant,flavour", VALID)
def test_generation_flops_match_flop_counter_mode(variant, flavour):
    """The plan-side count (bench_sample.generation_flops) against torch's FlopCounterMode over one generate call:
    the matmuls exactly; attention within the masked pairs FlopCounterMode counts densely (exact for one-slot
    steps and unmasked steps, e.g. raster, ARPG official); the total within 2% (tolerance stated here: the masked
    share of a 16-token debug generation is < 1%)."""
    from experiments.bench_sample import generation_flops

    m = make_module(variant, flavour)
    plan = [("official", 5), ("consistent", 5)] if m.ordering.capabilities.parallel else [("official", 16)]
    for mode, steps in plan:
        s, linear, dense_attention = _generation_flop_counts(m, steps, mode, 2.5)
        ours = generation_flops(m, 3, s)
        assert ours["body"] + ours["head"] == linear, f"{variant}/{flavour} {mode}: matmul FLOPs"
        assert 0 < ours["attention"] <= dense_attention
        if flavour == "llama" and (not m.ordering.capabilities.parallel or (variant == "arpg" and mode == "official")):
            assert ours["attention"] == dense_attention  # no masked pair anywhere
        total = linear + dense_attention
        assert abs(total - ours["total"]) <= 0.02 * total


def test_generation_bytes_hand_count_raster():
    """The roofline's read count for one raster generation, by hand: 16 one-token steps each read every linear weight
    once and the K/V rows written so far (step t sees t + 1 rows: the class slot and t tokens) in both layers, for
    the CFG-doubled batch; bf16 halves it."""
    from experiments.bench_sample import generation_flops
    from lightning_modules.flops import linear_weights

    m = make_module("raster")
    for precision, width in (("fp32", 4), ("bf16", 2)):
        s = m.sample_settings(cfg_scale=2.0, precision=precision)
        weights = linear_weights(m.backbone) * width
        kv = 2 * 3 * sum(t + 1 for t in range(16)) * 2 * 2 * 64 * width  # [cond; null] x keys x layers x K,V x dim
        assert generation_flops(m, 3, s)["bytes"] == 16 * weights + kv


@pytest.mark.parametrize("variant", ["randar", "arpg"])
def test_generation_attention_flops_equal_executed_visible_pairs(variant, monkeypatch):
    """Independent of the plan: every SDPA call of one generate call counts the True entries of the mask it gets
    (or every key when it gets none) — the visible pairs the cache attends to — which must equal the count."""
    from experiments.bench_sample import generation_flops

    m = make_module(variant)
    s = m.sample_settings(num_steps=5, cfg_scale=2.5, mode="consistent")
    counted = [0]
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
        B, H, Lq, hd = q.shape
        pairs = B * Lq * k.shape[2] if attn_mask is None else int(attn_mask.expand(B, 1, Lq, k.shape[2]).sum())
        counted[0] += 4 * H * hd * pairs
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting_sdpa)
    generate(m, torch.tensor([0, 1, 2]), s, make_generator(0))
    assert generation_flops(m, 3, s)["attention"] == counted[0]
