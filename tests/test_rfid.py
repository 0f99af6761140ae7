"""Reconstruction FID: zero for a perfect tokenizer, growing with reconstruction error, logged as val/rfid."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiments.train_tokenizer import digits_images
from lightning_modules.callbacks.rfid import ReconstructionFID, reconstruction_fid
from lightning_modules.metrics.extractors import load_extractor, save_digits_extractor, train_digits_extractor
from lightning_modules.tokenizer import VQTokenizerModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ext") / "digits.safetensors")
    model, info = train_digits_extractor(seed=0, epochs=3)
    save_digits_extractor(model, path, info)
    return load_extractor("digits", path)


def noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def test_rfid_is_zero_for_identity_and_grows_with_error(extractor):
    images, _ = digits_images("val", 16)
    assert abs(reconstruction_fid(extractor, images, images.clone())) < 1e-3
    fids = [reconstruction_fid(extractor, images, noisy(images, s)) for s in (10.0, 40.0, 120.0)]
    assert 0 < fids[0] < fids[1] < fids[2], fids
    with pytest.raises(ValueError, match="359 originals vs 10"):
        reconstruction_fid(extractor, images, images[:10])


def test_callback_logs_val_rfid_of_the_module_reconstructions(extractor):
    images, labels = digits_images("val", 8)
    images, labels = images[:64], labels[:64]
    module = VQTokenizerModule(vq={"codebook_size": 16, "encoder_ch_mult": [1, 1], "decoder_ch_mult": [1, 1]},
                               preset="digits", lr=1e-3)
    callback = ReconstructionFID(extractor, images)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[callback])
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=32),
                DataLoader(TensorDataset(images, labels), batch_size=32))
    expected = reconstruction_fid(extractor, images, module.reconstruct(images))
    assert callback.last is not None and callback.last > 0
    assert float(trainer.callback_metrics["val/rfid"]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        ReconstructionFID(extractor, images.float())
