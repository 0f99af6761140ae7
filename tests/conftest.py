"""Shared test fixtures: tiny modules for every ordering, with non-trivial weights."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
VENDORED_FIXTURES = os.path.join(REPO, "tests", "assets", "parity")  # the tiny fixtures, traces, schedules, manifest


def subprocess_env(*paths: str, **extra: str) -> dict:
    """os.environ for a CLI subprocess: ``paths`` put in front of PYTHONPATH, never in its place (the GPU image's
    packages arrive on PYTHONPATH: docs/benchmarks.md, "On a lent GPU"), plus ``extra`` variables."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, *kept]), **extra)


def _parity_fixtures() -> str:
    """ROAR_PARITY_FIXTURES if set; else ../shared/fixtures/parity (the full set, `small` sizes included) when it
    exists; else the vendored copy, so that a clean clone runs every parity test but the `small` ones."""
    env = os.environ.get("ROAR_PARITY_FIXTURES")
    if env:
        if not os.path.isdir(env):
            raise RuntimeError(f"ROAR_PARITY_FIXTURES={env} is not a directory")
        return os.path.abspath(env)
    full = os.path.join(SHARED, "fixtures", "parity")
    return full if os.path.isdir(full) else VENDORED_FIXTURES


FIXTURES = _parity_fixtures()


def parity_fixture(name: str) -> str:
    """Path of fixture ``name`` (e.g. "randar_small.pt"); skips, naming it, when this fixture set lacks it."""
    path = os.path.join(FIXTURES, name)
    if not os.path.isfile(path):
        pytest.skip(f"parity fixture {name} is not in {FIXTURES} (the vendored set has the tiny sizes only; "
                    f"ROAR_PARITY_FIXTURES=<full set> runs it)")
    return path

from lightning_modules.backbones import FLAVOURS  # noqa: E402
from lightning_modules.variants import capabilities, variant_names  # noqa: E402

# every (ordering, backbone flavour) pair the registry declares: new orderings are tested with no edit here
VALID = [(v, f) for f in FLAVOURS for v in variant_names() if f in capabilities(v).flavours]
# every training callback on, firing every 2 steps (sample grid, order map, FID/IS on the digits extractor, EMA):
# what the multi-rank runs (tests/test_scale_callbacks.py) and the GPU runs (tests/test_gpu.py) train with
EVERY_CALLBACK = ["callbacks.sample_every_steps=2", "callbacks.order_map_every_steps=2",
                  "callbacks.sample_classes=[0,1]", "callbacks.sample_per_class=1", "callbacks.ema_decay=0.9",
                  "eval.fid_num_samples=30", "eval.fid_every_steps=2", "trainer.log_every_steps=2"]


def make_module(variant: str, flavour: str = "llama", grid=(4, 4), vocab: int = 11, num_classes: int = 5,
                randomize: bool = True, **model_extra):
    """A debug-size module (dim 64, 2 layers, 4 heads), dropout off, with every weight randomised so that
    dependency tests can fail (the real init zeroes the head and the AdaLN gates)."""
    from lightning_modules.variants import build_module

    options = ({"llama": {"token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0}} if flavour == "llama"
               else {"rar_vit": {"dropout": 0.0, "attn_dropout": 0.0}})
    model = dict(variant=variant, flavour=flavour, size="debug", num_classes=num_classes, grid=list(grid),
                 class_dropout=0.0, **options, **model_extra)
    m = build_module(model, {"build": {"kind": "codes", "vocab_size": vocab}}, optim={"lr": 1e-3}, max_steps=100)
    if randomize:
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in m.backbone.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


@pytest.fixture(scope="session")
def quick_digits_extractor(tmp_path_factory) -> str:
    """A digits FID extractor file (2 epochs: where it is used, its quality is irrelevant), trained once."""
    from lightning_modules.metrics.extractors import save_digits_extractor, train_digits_extractor

    path = str(tmp_path_factory.mktemp("ext") / "digits.safetensors")
    model, info = train_digits_extractor(seed=0, epochs=2)
    save_digits_extractor(model, path, info)
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core box, 2 OpenMP threads spin-wait and run ~8x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def module_factory():
    return make_module
