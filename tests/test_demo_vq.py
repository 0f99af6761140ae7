"""The demo's VQ arm: the demo preset on the digits VQ's codes, with the pixel arms' budget, and a generator that
really trains on (and samples through) the VQ's codes."""
from __future__ import annotations

import os

import pytest
import torch

from experiments.config import batch_layout
from experiments.demo import arm_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_vq(tmp_path_factory) -> str:
    """An untrained digits-preset VQ saved as the project's tokenizer file (training it is not the point here)."""
    from lightning_modules.official.checkpoint_io import save_tokenizer
    from tokenizers.vq import LlamaGenVQ

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("digits_vq"))
    return save_tokenizer(LlamaGenVQ.from_preset("digits").eval(), out, kind="llamagen_vq")[0]


def test_vq_arm_has_the_pixel_arms_budget(digits_vq, tmp_path):
    pixel, vq = arm_config("raster", 0, str(tmp_path)), arm_config("raster", 0, str(tmp_path), vq_weights=digits_vq)
    assert (vq.name, vq.tokenizer.kind, vq.tokenizer.path, vq.data.image_size) == \
        ("raster_vq", "digits_vq", digits_vq, 32)
    assert batch_layout(vq) == batch_layout(pixel) and vq.trainer.max_steps == pixel.trainer.max_steps
    assert (vq.model.size, vq.model.variant, vq.seed) == (pixel.model.size, pixel.model.variant, pixel.seed)


def test_generator_trains_on_the_vq_codes_and_samples_through_the_decoder(digits_vq, tmp_path):
    from experiments.build import build_datamodule
    from experiments.checkpoints import load_generator
    from experiments.train import run
    from tokenizers.registry import build_tokenizer

    cfg = arm_config("randar", 2, str(tmp_path), vq_weights=digits_vq,
                     extra=["model.size=debug", "trainer.val_every_steps=1", "trainer.limit_val_batches=1",
                            f"data.root={tmp_path}/digits", "callbacks.sample_every_steps=0"])
    result = run(cfg, quiet=True)
    assert result["val_nll_bits"] == result["val_nll_bits"] and result["val_nll_bits"] > 0  # finite, trained
    module = load_generator(os.path.join(result["run_dir"], "checkpoints", "last.ckpt")).eval()
    tok = build_tokenizer("digits_vq", path=digits_vq)
    assert module.tokenizer_fingerprint == tok.fingerprint and module.backbone.vocab_size == tok.vocab_size == 128
    dm, grid = build_datamodule(cfg, micro_batch=4)
    assert grid == (8, 8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32)
    # what the training step consumes are exactly the VQ's codes of the DataModule's images
    assert torch.equal(module.codes_from_batch(batch), tok.encode(batch["image"]).flatten(1))
    images = module.sample_images(torch.tensor([0, 3]), seed=0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
