"""FIDCallback: fixed labels/seeds across variants and rank counts, EMA swap, val/fid{n} logging."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from datamodules.digits import digits_arrays
from lightning_modules.callbacks.fid import FIDCallback, batch_seed, count_tag, eval_plan
from lightning_modules.metrics.extractors import save_digits_extractor, train_digits_extractor


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model, info = train_digits_extractor(seed=0, epochs=4)
    path = str(tmp_path_factory.mktemp("ext") / "digits.safetensors")
    save_digits_extractor(model, path, info)
    return path


class StubGenerator(LightningModule):
    """Stands in for a generator: records sample_images inputs; returns real digits of the asked class."""

    def __init__(self, width: int = 2, noise: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, 1)
        self.calls = []
        x, y = digits_arrays("train")
        self.bank = [torch.from_numpy(x[y == c]) for c in range(10)]  # per class uint8 [n_c, 8, 8]

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(32, self.hparams.width)), batch_size=4)

    def sample_images(self, labels, seed, **kwargs):
        self.calls.append((labels.tolist(), seed, dict(kwargs), self.training))
        g = torch.Generator().manual_seed(seed)
        imgs = torch.stack([self.bank[c][torch.randint(len(self.bank[c]), (), generator=g)] for c in labels.tolist()])
        if self.hparams.noise:
            imgs = (imgs + self.hparams.noise * 255 * torch.randn(imgs.shape, generator=g)).clamp(0, 255).byte()
        return imgs[:, None].expand(-1, 3, -1, -1)                     # uint8 [n, 3, 8, 8]


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


class FakeEMA(Callback):
    def __init__(self):
        self.entered = 0

    @contextlib.contextmanager
    def ema_weights(self, pl_module):
        self.entered += 1
        yield


def _fit(module, callback, max_steps=4, extra=()):
    logger = RecordingLogger()
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=[callback, *extra],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1000)  # FID must reach the logger regardless of log_every_n_steps
    trainer.fit(module)
    return trainer, logger


def test_count_tag_and_batch_seed():
    assert [count_tag(n) for n in (200, 1000, 1500, 10000, 50000)] == ["200", "1k", "1500", "10k", "50k"]
    assert batch_seed(0, 1) != batch_seed(1, 0) and batch_seed(3, 7) == batch_seed(3, 7)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_eval_plan_is_the_same_set_for_any_rank_count(world):
    single = {b: (lab.tolist(), idx.tolist(), s) for b, lab, idx, s in eval_plan(103, 10, 16, seed=5)}
    merged = {}
    for rank in range(world):
        for b, lab, idx, s in eval_plan(103, 10, 16, seed=5, rank=rank, world_size=world):
            assert b not in merged                                    # disjoint slices
            merged[b] = (lab.tolist(), idx.tolist(), s)
    assert merged == single and sum(len(v[1]) for v in single.values()) == 103
    labels = np.concatenate([single[b][0] for b in sorted(single)])
    np.testing.assert_array_equal(labels, np.arange(103) % 10)       # class-balanced, fixed


def test_fid_callback_same_labels_and_seeds_for_different_generators(weights):
    kwargs = dict(every_n_steps=2, num_samples=30, num_classes=10, extractor_kind="digits", extractor_path=weights,
                  ref="digits", seed=7, batch_size=8, sample_kwargs={"temperature": 1.0})
    good, noisy = StubGenerator(width=2), StubGenerator(width=5, noise=0.5)
    cb_good, cb_noisy = FIDCallback(**kwargs), FIDCallback(**kwargs)
    ema = FakeEMA()
    trainer, logger = _fit(good, cb_good, extra=[ema])
    _fit(noisy, cb_noisy)
    # steps 2 and 4 (fit end coincides with step 4: not evaluated twice), 4 batches each
    assert len(good.calls) == 8 and [c[:3] for c in good.calls] == [c[:3] for c in noisy.calls]
    assert good.calls[0] == ([0, 1, 2, 3, 4, 5, 6, 7], batch_seed(7, 0), {"temperature": 1.0}, False)  # eval mode
    assert good.calls[3][0] == [4, 5, 6, 7, 8, 9]                   # last partial batch: samples 24..29
    assert good.calls[:4] == good.calls[4:]                           # identical set at every evaluation
    assert ema.entered == 2 and cb_good.last_results["fid_eval"]["ema"] is True
    assert cb_noisy.last_results["fid_eval"]["ema"] is False
    assert good.training or trainer.state.finished                    # train mode restored
    logged = [m for _, m in logger.records if "val/fid30" in m]
    assert [s for s, m in logger.records if "val/fid30" in m] == [2, 4] and "val/is30" in logged[0]
    assert "val/fid30" in trainer.callback_metrics
    assert cb_good.last_results["val/fid30"] == pytest.approx(logged[-1]["val/fid30"])
    assert cb_good.last_results["fid_eval"]["step"] == 4 and cb_good.last_results["fid_eval"]["num_samples"] == 30
    assert cb_noisy.last_results["val/fid30"] > cb_good.last_results["val/fid30"]   # noise costs FID
    # class-consistency of the set, logged with FID: the share the extractor assigns to the asked class, as
    # lightning_modules/metrics/consistency.py computes it from the same images
    from lightning_modules.metrics.consistency import class_consistency
    from lightning_modules.metrics.extractors import load_extractor

    asked = list(good.calls[:4])
    images = torch.cat([good.sample_images(torch.tensor(labels), seed) for labels, seed, _, _ in asked])
    labels = torch.tensor([c for labels, _, _, _ in asked for c in labels])
    want = class_consistency(load_extractor("digits", weights), images, labels)
    assert cb_good.last_results["val/class_consistency30"] == pytest.approx(want) and want > 0.5
    assert "val/class_consistency30" in logged[0]
    assert cb_noisy.last_results["val/class_consistency30"] < cb_good.last_results["val/class_consistency30"]
    assert cb_good.state_dict()["last_results"]["val/fid30"] == cb_good.last_results["val/fid30"]


def test_fid_callback_fit_end_only_and_callable_reference(weights):
    calls = []

    def ref(extractor):
        calls.append(extractor.name)
        return np.zeros(extractor.num_features), np.eye(extractor.num_features)

    cb = FIDCallback(every_n_steps=0, num_samples=12, num_classes=10, extractor_kind="digits",
                     extractor_path=weights, ref=ref, batch_size=5)
    module = StubGenerator()
    _, logger = _fit(module, cb, max_steps=3)
    assert len(calls) == 1 and len(module.calls) == 3                # 5 + 5 + 2 samples, once, at fit end
    assert [s for s, m in logger.records if "val/fid12" in m] == [3]


def test_fid_callback_fails_fast_on_bad_paths(tmp_path):
    cb = FIDCallback(every_n_steps=1, num_samples=10, num_classes=10, extractor_kind="inception",
                     extractor_path="", ref="digits")
    with pytest.raises(ValueError, match="eval.inception_weights"):
        _fit(StubGenerator(), cb, max_steps=1)
    with pytest.raises(ValueError, match="num_samples"):
        FIDCallback(num_samples=0, num_classes=10)


def test_fid_callback_reports_sampling_progress_and_images_per_second(weights, monkeypatch, capsys):
    """Rank 0's sampling shows lightning_modules/progress.py lines where the trainer shows progress (here forced to
    the non-TTY mode), and the sampling throughput is logged beside FID."""
    monkeypatch.setenv("ROAR_PROGRESS", "lines")
    monkeypatch.setenv("ROAR_PROGRESS_EVERY_S", "0")
    cb = FIDCallback(every_n_steps=0, num_samples=12, num_classes=10, extractor_kind="digits",
                     extractor_path=weights, ref="digits", batch_size=5)
    trainer = Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                      enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False)
    trainer.fit(StubGenerator())
    err = capsys.readouterr().err
    assert "[fid] step 2: sampling (rank 0's share): 5/12 images" in err and "12/12 images (100.0%)" in err
    assert cb.last_results["val/sample_images_per_s"] > 0
    _fit(StubGenerator(), FIDCallback(every_n_steps=0, num_samples=12, num_classes=10, extractor_kind="digits",
                                      extractor_path=weights, ref="digits", batch_size=5), max_steps=2)
    assert "sampling (rank 0's share)" not in capsys.readouterr().err  # no progress bar in the trainer: no lines
