"""VQTokenizerModule: trains the LlamaGen-layout VQ (tokenizers.vq.LlamaGenVQ) as in LlamaGen's vq_train.py.

Loss (generator step) = rec_weight * L1|L2(x, x_rec) + perceptual_weight * LPIPS(x, x_rec)
                      + codebook_weight * (codebook + 0.25 commitment + entropy)
                      + disc_weight * hinge generator loss (from step ``disc_start`` on).
The discriminator is a PatchGAN trained with the hinge loss on its own optimiser (manual optimisation: one
generator step, then one discriminator step per batch). Unlike LlamaGen we use a fixed adversarial weight
(no adaptive weight from last-layer gradient norms): simpler and stable at the small scales we train here.

Perceptual loss: LPIPS-VGG16 computed from a USER-SUPPLIED local weights file (torchvision vgg16 key names
``features.N.*``; optional LPIPS linear heads ``lin{k}.model.1.weight`` from ``perceptual_lin_path``, else
unit channel weights). No weights are ever downloaded; a missing file is a FileNotFoundError naming it.

Batches: a uint8 tensor [B,3,H,W] (or [B,1,H,W], replicated), a (images, labels) tuple/list, or a dict
with "image"/"images"; float images are taken to be in [-1, 1] already.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.vq import LlamaGenVQ, preset_config

VGG_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision vgg16.features
VGG_WIDTHS = (64, 128, 256, 512, 512)


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, stride 2 for ``n_layers`` levels, one real/fake logit per patch."""

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 1, h', w'] logits
        return self.main(x)


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (same indices / keys), without the 100M-param
    classifier that building the full torchvision model would allocate."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = v
    return nn.Sequential(*layers[: VGG_TAPS[-1] + 1])


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG16 features loaded from local files (frozen)."""

    def __init__(self, vgg_path: str, lin_path: str = ""):
        super().__init__()
        from lightning_modules.official.checkpoint_io import load_state_dict_file, strict_load

        sd = load_state_dict_file(vgg_path)  # FileNotFoundError names the file
        features = vgg16_features()
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        strict_load(features, feats, f"perceptual VGG16 weights {vgg_path}")
        self.features = features
        lins = [torch.ones(1, c, 1, 1) for c in VGG_WIDTHS]
        if lin_path:
            lsd = load_state_dict_file(lin_path)
            missing = [f"lin{i}.model.1.weight" for i in range(5) if f"lin{i}.model.1.weight" not in lsd]
            if missing:
                raise ValueError(f"{lin_path}: LPIPS linear heads missing {missing}")
            lins = [lsd[f"lin{i}.model.1.weight"].float().view(1, -1, 1, 1) for i in range(5)]
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w)
        # LPIPS input scaling (images in [-1, 1])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] x2 in [-1,1] -> scalar
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = x.new_zeros(())
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == VGG_TAPS[tap]:
                fx, fy = h.chunk(2)
                fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit-normalise channels
                fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + ((fx - fy).pow(2) * getattr(self, f"lin{tap}")).sum(1).mean()
                tap += 1
        return total


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def code_stats(codes: torch.Tensor, vocab: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity = exp(entropy of the code histogram))."""
    counts = torch.bincount(codes.flatten(), minlength=vocab).float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


# Ours, not torchmetrics' PeakSignalNoiseRatio: that is inf for an identical image; ours caps it at 100 dB per image.
def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) between uint8 images [B,3,H,W]; identical images give 100 dB (capped)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10)), torch.full_like(mse, 100.0))


class VQTokenizerModule(L.LightningModule):
    def __init__(self, preset: str = "digits", vq: dict | None = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.05, rec_loss: str = "l2",
                 rec_weight: float = 1.0, codebook_weight: float = 1.0, perceptual_weight: float = 0.0,
                 perceptual_path: str = "", perceptual_lin_path: str = "", disc_start: int = -1,
                 disc_weight: float = 0.5, disc_lr: float | None = None, disc_ndf: int = 64, disc_layers: int = 3,
                 grad_clip: float = 1.0, num_log_images: int = 8):
        super().__init__()
        self.save_hyperparameters()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"tokenizer_train.rec_loss: expected 'l1' or 'l2', got {rec_loss!r}")
        if perceptual_weight > 0 and not perceptual_path:
            raise ValueError("tokenizer_train.perceptual_path: perceptual_weight > 0 needs a local VGG16 weights file")
        self.automatic_optimization = False  # generator + discriminator steps per batch
        self.vq = LlamaGenVQ(**preset_config(preset, **(vq or {})))
        self.perceptual = PerceptualLoss(perceptual_path, perceptual_lin_path) if perceptual_weight > 0 else None
        self.disc = PatchDiscriminator(3, disc_ndf, disc_layers) if disc_start >= 0 else None
        self._val_codes: list[torch.Tensor] = []

    # ---------------------------------------------------------------- data
    @staticmethod
    def batch_images(batch) -> torch.Tensor:
        if isinstance(batch, dict):
            batch = batch.get("images", batch.get("image"))
        elif isinstance(batch, (list, tuple)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"VQTokenizerModule: expected images [B,3,H,W] (or [B,1,H,W]), got "
                             f"{list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch

    def model_space(self, images: torch.Tensor) -> torch.Tensor:  # -> float [-1, 1]
        return LlamaGenVQ.to_model_space(images) if images.dtype == torch.uint8 else images.float()

    # ---------------------------------------------------------------- losses
    def generator_losses(self, x: torch.Tensor, adversarial: bool):
        """x [B,3,H,W] in [-1,1] -> (total loss, logs, reconstruction [B,3,H,W], codes [B,h,w])."""
        rec, q, codes = self.vq(x)
        rec_loss = F.l1_loss(rec, x) if self.hparams.rec_loss == "l1" else F.mse_loss(rec, x)
        logs = {"rec_loss": rec_loss, "codebook_loss": q["codebook"], "commit_loss": q["commit"],
                "entropy_loss": q["entropy"]}
        total = (self.hparams.rec_weight * rec_loss
                 + self.hparams.codebook_weight * (q["codebook"] + q["commit"] + q["entropy"]))
        if self.perceptual is not None:
            logs["perceptual_loss"] = self.perceptual(x, rec)
            total = total + self.hparams.perceptual_weight * logs["perceptual_loss"]
        if adversarial:
            logs["g_loss"] = -self.disc(rec).mean()
            total = total + self.hparams.disc_weight * logs["g_loss"]
        logs["loss"] = total
        return total, logs, rec, codes

    def on_train_epoch_start(self):
        # Lightning >= 2.5 keeps each submodule's train/eval mode as found; the VQ must train (losses, usage ring).
        self.vq.train()
        if self.disc is not None:
            self.disc.train()

    @property
    def batches_seen(self) -> int:
        # With manual optimisation global_step counts optimiser steps: 2 per batch when a disc is trained.
        return self.global_step // (2 if self.disc is not None else 1)

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        opt_g, opt_d = opts if isinstance(opts, (list, tuple)) else (opts, None)
        x = self.model_space(self.batch_images(batch))
        adversarial = self.disc is not None and self.batches_seen >= self.hparams.disc_start
        total, logs, rec, codes = self.generator_losses(x, adversarial)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if self.hparams.grad_clip > 0:
            self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        if opt_d is not None:
            # The disc optimiser steps every batch (loss masked to 0 before disc_start) so that global_step
            # always advances by 2 per batch and ``batches_seen`` stays exact.
            d_loss = hinge_d_loss(self.disc(x), self.disc(rec.detach())) * float(adversarial)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            logs["d_loss"] = d_loss
        usage, ppl = code_stats(codes, self.vq.vocab_size)
        logs = {f"train/{k}": v.detach() for k, v in logs.items()}
        logs.update({"train/batch_codebook_usage": usage, "train/perplexity": ppl,
                     "train/ring_codebook_usage": self.vq.codebook_usage()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return total.detach()

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self):
        self._val_codes = []

    def validation_step(self, batch, batch_idx):
        images = self.batch_images(batch)
        x = self.model_space(images)
        rec, _, codes = self.vq(x)
        pixels = images if images.dtype == torch.uint8 else LlamaGenVQ.to_pixels(images)
        rec_pixels = LlamaGenVQ.to_pixels(rec)
        rec_loss = F.l1_loss(rec, x) if self.hparams.rec_loss == "l1" else F.mse_loss(rec, x)
        self.log_dict({"val/rec_loss": rec_loss, "val/psnr": psnr_uint8(pixels, rec_pixels).mean()},
                      on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self._val_codes.append(codes.flatten().cpu())
        if batch_idx == 0:
            self.log_reconstructions(pixels, rec_pixels)

    def on_validation_epoch_end(self):
        if self._val_codes:
            usage, ppl = code_stats(torch.cat(self._val_codes), self.vq.vocab_size)
            self.log_dict({"val/codebook_usage": usage, "val/perplexity": ppl})
        self._val_codes = []

    def log_reconstructions(self, pixels: torch.Tensor, rec_pixels: torch.Tensor) -> None:
        """Originals (top row) over reconstructions (bottom row) as a TensorBoard image grid."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        grid = reconstruction_grid(pixels, rec_pixels, self.hparams.num_log_images)
        experiment.add_image("val/reconstructions", grid, global_step=self.batches_seen)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> uint8 [B,3,H,W] through encode -> quantise -> decode (for reconstruction FID)."""
        was_training = self.vq.training
        self.vq.eval()
        try:
            return self.vq.decode(self.vq.encode(images))
        finally:
            self.vq.train(was_training)

    def configure_optimizers(self):
        hp = self.hparams
        opt_g = torch.optim.AdamW(self.vq.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if self.disc is None:
            return opt_g
        opt_d = torch.optim.AdamW(self.disc.parameters(), lr=hp.disc_lr or hp.lr, betas=tuple(hp.betas),
                                  weight_decay=hp.weight_decay)
        return [opt_g, opt_d]


def reconstruction_grid(pixels: torch.Tensor, rec_pixels: torch.Tensor, n: int = 8) -> torch.Tensor:
    """uint8 [3, 2*H+pad, n*W+pad] grid: originals on the top row, reconstructions below."""
    from lightning_modules.callbacks.images import image_grid

    n = min(n, pixels.shape[0])
    both = torch.cat([pixels[:n], rec_pixels[:n]]).cpu()
    return image_grid(both, nrow=n, pad=2, pad_value=128)
