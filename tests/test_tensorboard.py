"""What a Lightning user expects in TensorBoard: a sweep opens in the HParams tab with every run's config and final
metrics (read here through TensorBoard's own hparams plugin backend, as `tensorboard --logdir` serves it), the
config as text, throughput and MFU scalars from Lightning's ThroughputMonitor fed with the benchmark's FLOP count,
and a train/grad_norm that is right under DeepSpeed ZeRO as under DDP."""
from __future__ import annotations

import math
import os

import pytest

from conftest import REPO
from experiments.config import load_config
from experiments.train import run

DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")
VARIANTS = ("raster", "arpg")
STEPS = 3
FAKE_PEAK = 1e12  # FLOP/s: stands in for a GPU's spec peak, so the MFU path runs on a CPU


def sweep_config(tmp, variant: str, extractor: str):
    return load_config([DEMO], [f"model.variant={variant}", "model.size=debug", f"out_dir={tmp}/sweep",
                                f"data.root={tmp}/digits", "trainer.global_batch_size=16", f"trainer.max_steps={STEPS}",
                                f"trainer.val_every_steps={STEPS}", "trainer.log_every_steps=1",
                                "trainer.limit_val_batches=1", "callbacks.sample_every_steps=0",
                                "eval.fid_num_samples=20", f"eval.extractor_weights={extractor}", f"name={variant}"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two runs into one out_dir, like a sweep; the second one with a device peak (MFU defined)."""
    from lightning_modules import flops
    from lightning_modules.metrics.extractors import save_digits_extractor, train_digits_extractor

    tmp = tmp_path_factory.mktemp("tb")
    extractor = str(tmp / "digits.safetensors")
    model, info = train_digits_extractor(seed=0, epochs=2)
    save_digits_extractor(model, extractor, info)
    results = {"raster": run(sweep_config(tmp, "raster", extractor), quiet=True)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flops, "device_peak_flops", lambda device, dtype: (FAKE_PEAK, "test peak"))
        results["arpg"] = run(sweep_config(tmp, "arpg", extractor), quiet=True)
    return str(tmp / "sweep"), results, extractor


def hparams_view(logdir: str):
    """(experiment, session groups sorted by val/nll) as TensorBoard's HParams tab gets them from its backend."""
    from tensorboard import context
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    tb = base_plugin.TBContext(data_provider=MultiplexerDataProvider(mux, logdir), logdir=logdir, multiplexer=mux)
    backend, ctx = backend_context.Context(tb), context.RequestContext()
    experiment = get_experiment.Handler(ctx, backend, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=10, allowed_statuses=[api_pb2.STATUS_SUCCESS],
        col_params=[api_pb2.ColParams(metric=api_pb2.MetricName(tag="val/nll"), order=api_pb2.ORDER_ASC)])
    return experiment, list_session_groups.Handler(ctx, backend, "", request).run().session_groups, mux


def test_a_sweep_shows_every_run_with_its_config_and_final_metrics(sweep):
    from omegaconf import OmegaConf

    from experiments.readers import config_leaves

    logdir, results, _ = sweep
    experiment, groups, mux = hparams_view(logdir)
    leaves = config_leaves(load_config([DEMO]))
    assert {h.name for h in experiment.hparam_infos} == {*leaves, "params"}  # every leaf, dotted
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"val/nll", "val/fid20", "val/is20", "val/sample_images_per_s", "train/tokens_seen",
            "train/loss"} <= metric_tags
    assert {g.name for g in groups} == {f"{v}/tb" for v in VARIANTS}
    nll = [r["val_nll_bits"] for r in sorted(results.values(), key=lambda r: r["val_nll_bits"])]
    for group, expected in zip(groups, nll):  # sorted by val/nll, as the tab sorts a column
        variant = group.name.split("/")[0]
        result, hp = results[variant], group.hparams
        assert hp["model.variant"].string_value == variant and hp["params"].number_value == result["params"]
        assert hp["optim.lr"].number_value == 1e-3 and hp["trainer.max_steps"].number_value == STEPS
        assert hp["optim.betas"].string_value == "[0.9, 0.95]"  # lists as strings
        values = {m.name.tag: m.value for m in group.metric_values}
        assert values["val/nll"] == pytest.approx(expected) == pytest.approx(result["val_nll_bits"])
        assert values["val/fid20"] == pytest.approx(result["val/fid20"]) and values["val/sample_images_per_s"] > 0
        assert values["train/tokens_seen"] == result["tokens_seen"] == STEPS * 16 * 64
        assert all(m.training_step == STEPS for m in group.metric_values)  # the final step, after every curve point
        cfg_text = mux.Tensors(group.name, "config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert "variant: " + variant in cfg_text and OmegaConf.create(cfg_text.replace("\n    ", "\n")[4:])


def test_throughput_and_mfu_scalars_use_the_benchmarks_flop_count(sweep):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from experiments.bench_train import train_flops  # the benchmark's count (lightning_modules/flops.py)
    from experiments.build import build_lightning_module

    logdir, _, extractor = sweep
    for variant in VARIANTS:
        events = EventAccumulator(os.path.join(logdir, variant, "tb"), size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags()["scalars"])
        last = {t: events.Scalars(t)[-1].value for t in tags}
        for tag in ("train/device/samples_per_sec", "train/device/items_per_sec", "train/device/flops_per_sec"):
            assert last[tag] > 0, tag
        assert last["train/device/items_per_sec"] == pytest.approx(64 * last["train/device/samples_per_sec"])
        module = build_lightning_module(sweep_config(os.path.dirname(logdir), variant, extractor), (8, 8))
        per_batch = train_flops(module, torch.zeros(16, 64, dtype=torch.long), torch.zeros(16, dtype=torch.long))
        rate = last["train/device/flops_per_sec"] / last["train/device/batches_per_sec"]
        assert rate == pytest.approx(per_batch["total"], rel=1e-5)
        if variant == "arpg":  # a device peak: MFU = model FLOP/s / peak
            assert last["train/device/mfu"] == pytest.approx(last["train/device/flops_per_sec"] / FAKE_PEAK, rel=1e-5)
        else:  # CPU: no peak, no MFU (lightning_modules/flops.py::device_peak_flops says why)
            assert "train/device/mfu" not in tags


def test_no_mfu_peak_on_cpu():
    import torch

    from lightning_modules.flops import device_peak_flops

    peak, why = device_peak_flops(torch.device("cpu"), torch.float32)
    assert peak is None and "no MFU on cpu" in why


def tb_scalars(run_dir: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.slow
def test_grad_norm_under_zero_is_finite_and_equals_ddp(tmp_path):
    """Two CPU ranks each: ZeRO-2 / ZeRO-3 partition the gradients (p.grad is None), so the norm comes from the
    engine; it must be DDP's on the same data, weights and dropout masks (only the reduction order differs)."""
    from test_scale_strategies import train

    common = ("trainer.log_every_steps=1", "callbacks.sample_every_steps=0", "trainer.max_steps=3")
    _, ddp_log = train(tmp_path, "ddp", "trainer.strategy=ddp", *common)
    ddp = tb_scalars(str(tmp_path / "ddp"), "train/grad_norm")
    assert len(ddp) == 3 and ddp_log.count("roar: ddp: raster on") == 1  # start-up line: rank 0 only
    for stage in (2, 3):
        train(tmp_path, f"zero{stage}", f"trainer.strategy=deepspeed_stage_{stage}", *common)
        zero = tb_scalars(str(tmp_path / f"zero{stage}"), "train/grad_norm")
        assert sorted(zero) == sorted(ddp) and all(math.isfinite(v) and v > 0 for v in zero.values())
        for step in ddp:
            assert zero[step] == pytest.approx(ddp[step], rel=1e-4), (stage, step, zero, ddp)
