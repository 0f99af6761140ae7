"""VQTokenizerModule: a short run lowers the reconstruction loss; disc/logging/PSNR paths; perceptual file
handling; the digits training script writes a tokenizer a generator can load by path."""
from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from experiments.train_tokenizer import digits_images
from lightning_modules.tokenizer import (PerceptualLoss, VQTokenizerModule, code_stats, psnr_uint8,
                                         vgg16_features)

# 2 levels (f = 2) on the native 8x8 digits: a few ms per step, so the tests stay fast on a busy 2-core box.
SMALL_VQ = {"codebook_size": 32, "encoder_ch_mult": [1, 1], "decoder_ch_mult": [1, 1]}
SIZE = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(steps: int, **kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    base.update(kw)
    return L.Trainer(**base)


@pytest.fixture(scope="module")
def digits_small():
    images, labels = digits_images("train", SIZE)
    return images[:32], labels[:32]


def rec_mse(module: VQTokenizerModule, images: torch.Tensor) -> float:
    was_training = module.vq.training
    module.vq.eval()
    with torch.no_grad():
        x = module.model_space(images)
        mse = float(F.mse_loss(module.vq(x)[0], x))
    module.vq.train(was_training)
    return mse


def test_short_training_decreases_reconstruction_loss(digits_small):
    L.seed_everything(0, verbose=False)
    images, labels = digits_small
    module = VQTokenizerModule(preset="digits", vq=SMALL_VQ, lr=2e-3, weight_decay=0.0)
    before = rec_mse(module, images)
    loader = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True)
    trainer(30).fit(module, loader)
    after = rec_mse(module, images)
    assert after < 0.5 * before, (before, after)
    assert module.vq.codebook_usage() > 1 / 32  # the usage ring saw more than one code


def test_disc_logging_psnr_and_reconstruct(digits_small, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    images, labels = digits_small
    module = VQTokenizerModule(preset="digits", vq=SMALL_VQ, lr=1e-3, disc_start=2, disc_layers=1, disc_ndf=32,
                               rec_loss="l1")
    loader = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    disc_before = [p.detach().clone() for p in module.disc.parameters()]
    t = trainer(8, logger=logger, log_every_n_steps=1, limit_val_batches=1, val_check_interval=2)
    t.fit(module, loader, DataLoader(TensorDataset(images[16:], labels[16:]), batch_size=8))
    metrics = t.callback_metrics
    assert module.batches_seen == 4 and t.global_step == 8  # 2 optimiser steps per batch
    for key in ("train/rec_loss", "train/commit_loss", "train/d_loss", "train/g_loss", "train/perplexity",
                "val/psnr", "val/rec_loss", "val/codebook_usage", "val/perplexity"):
        assert key in metrics, key
    assert float(metrics["train/d_loss"]) > 0  # the disc is trained once batches_seen >= disc_start
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.disc.parameters()))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    module.vq.train()
    out = module.reconstruct(images[:4])  # eval-mode codec, training mode restored afterwards
    assert out.dtype == torch.uint8 and out.shape == (4, 3, SIZE, SIZE) and module.vq.training
    module.vq.eval()
    assert torch.equal(out, module.vq.decode(module.vq.encode(images[:4])))


def test_metric_helpers():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[1] = 255
    assert psnr_uint8(a, b).tolist() == [100.0, 0.0]
    usage, ppl = code_stats(torch.tensor([0, 0, 1, 1]), vocab=8)
    assert usage == 0.25 and abs(ppl - 2.0) < 1e-5


def test_bad_options_and_missing_perceptual_file(tmp_path):
    with pytest.raises(ValueError, match="rec_loss"):
        VQTokenizerModule(rec_loss="l3")
    with pytest.raises(ValueError, match="perceptual_path"):
        VQTokenizerModule(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError, match="no_vgg.safetensors"):
        VQTokenizerModule(perceptual_weight=1.0, perceptual_path=str(tmp_path / "no_vgg.safetensors"))
    with pytest.raises(ValueError, match="expected images"):
        VQTokenizerModule.batch_images(torch.zeros(2, 4, 8, 8))


def test_perceptual_loss_from_local_vgg_file(tmp_path):
    from lightning_modules.official.checkpoint_io import save_state_dict_file

    torch.manual_seed(0)
    path = str(tmp_path / "vgg16.safetensors")
    save_state_dict_file(path, {f"features.{k}": v for k, v in vgg16_features().state_dict().items()})
    loss = PerceptualLoss(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert float(loss(x, x)) < 1e-6 < float(loss(x, y))
    assert not any(p.requires_grad for p in loss.parameters())


def test_train_tokenizer_script_writes_loadable_tokenizer(tmp_path):
    from experiments.train_tokenizer import main
    from tokenizers.registry import build_tokenizer

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "digits_vq")
    extractor = str(tmp_path / "digits_extractor.safetensors")
    metrics = main(["--out", out, "-c", os.path.join(repo, "experiments/configs/tokenizer/digits_vq.yaml"),
                    "--max-steps", "2", "--batch-size", "16", "--set", "tokenizer.vq.codebook_size=64",
                    "--set", f"train.extractor_weights={extractor}"])
    assert os.path.isfile(extractor)  # the rFID extractor is trained when missing
    for name in ("tokenizer.safetensors", "tokenizer.json", "reconstructions.png", "metrics.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["steps"] == 2 and saved["vocab_size"] == 64 and saved["grid"] == [8, 8]
    assert 0 < saved["val_psnr"] < 100 and 0 < saved["val_codebook_usage"] <= 1
    assert saved["val_rfid"] > 0 and saved["rfid_images"] == 359  # 2 steps: far from the originals
    info = json.load(open(os.path.join(out, "tokenizer.json")))
    tok = build_tokenizer(info["kind"], path=os.path.join(out, "tokenizer.safetensors"))
    assert tok.fingerprint == info["fingerprint"] == metrics["fingerprint"] and tok.vocab_size == 64


def test_digits_images_are_what_the_generator_image_path_feeds():
    """The VQ learns from the images a generator's ImageShardDataModule makes of the embedded shards at the same
    size (to_rgb + PIL bicubic resize), so the codes a generator trains on are in the VQ's training domain."""
    import random

    from datamodules.digits import digits_arrays
    from datamodules.embedded import png_bytes
    from datamodules.images import ImageDecoder

    raw, labels = digits_arrays("val")
    images, same_labels = digits_images("val", 32)
    decode = ImageDecoder(32, "none", random_flip=False)
    for i in (0, 7, 100):
        arr, label = decode({"png": png_bytes(raw[i]), "cls": str(int(labels[i])).encode()}, random.Random(0), True)
        assert torch.equal(torch.from_numpy(arr.copy()).permute(2, 0, 1), images[i]) and label == int(same_labels[i])
    assert images.shape == (359, 3, 32, 32) and images.dtype == torch.uint8
    with pytest.raises(ValueError, match="data.upsample"):
        digits_images("val", 32, upsample="lanczos")


@pytest.mark.slow
def test_train_tokenizer_script_is_bit_reproducible_with_two_threads(tmp_path):
    """Same command, same weights: with 2 CPU threads some kernels reduce in a varying order unless Lightning's
    deterministic mode is on (two runs differed by 0.2 dB PSNR after these 30 steps)."""
    from safetensors.torch import load_file

    from experiments.train_tokenizer import main

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extractor = str(tmp_path / "digits_extractor.safetensors")
    weights = []
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run), "-c", os.path.join(repo, "experiments/configs/tokenizer/digits_vq.yaml"),
              "--max-steps", "30", "--set", "train.num_threads=2",
              "--set", f"train.extractor_weights={extractor}"])
        weights.append(load_file(str(tmp_path / run / "tokenizer.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_image_size_the_vq_cannot_divide_is_one_config_line(tmp_path, capsys):
    """data.image_size must be a multiple of the VQ's downsampling (it used to end in a shape traceback after the
    data was loaded)."""
    from experiments.train_tokenizer import cli

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["--out", str(tmp_path / "vq"), "-c", os.path.join(repo, "experiments/configs/tokenizer/small_vq.yaml"),
            "--set", "train.extractor=none"]
    assert cli([*argv, "--set", "data.image_size=60"]) == 2
    assert capsys.readouterr().err.strip() == ("error: config data.image_size: 60 is not divisible by the VQ's "
                                               "downsampling 8 (tokenizer.vq.encoder_ch_mult)")
    assert cli([*argv, "--set", "data.image_size=36", "--set", "tokenizer.vq.encoder_ch_mult=[1,1,2]",
                "--set", "tokenizer.vq.decoder_ch_mult=[1,1,2]"]) == 2
    assert "data.train_shards" in capsys.readouterr().err  # 36 / 4: the size passes, the next check speaks
