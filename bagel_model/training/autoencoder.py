"""Train the tiny FLUX-architecture autoencoder on shapes-world images, then fix its latent scale.

The bundled model's AE is the official FLUX `AutoEncoder` module, only narrower. It is trained first and
then frozen, as BAGEL freezes its VAE (`freeze_vae True`): the decoder then learns a fixed latent space.

Objective: L1 + L2 reconstruction of a posterior *sample* (z = mean + exp(logvar / 2) * noise) plus a
small KL term. Pixel losses are enough here: shapes-world images are flat colors with hard edges and no
texture, and perceptual (LPIPS) or adversarial losses exist to restore texture that pixel losses blur.
The scorer reads mean colors and half-maximum fill ratios, which pixel losses optimise directly. Decoding
a *sample* during training teaches the decoder to tolerate small latent errors, which is what a tiny
generator will make. After training, `scale_factor` / `shift_factor` are set from the statistics of the
posterior means (as FLUX/SD choose theirs) so the generator sees roughly unit-variance latents.

Not here: anything of the BAGEL decoder, tokenizer or packing; files (the recipe saves the result).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from ..config import ImageLimits, VAEConfig
from ..images import resize, to_tensor
from ..layers.vae import AutoEncoder
from ..shapes import Scene, render, sample_scene, sample_world, view
from .schedule import warmup_cosine_lr

# The bundled AE: 32 channels at every level (32 is the smallest width FLUX's GroupNorm(32) allows), no
# resnet in the encoder levels and one per decoder level. Full-resolution convolutions dominate the cost
# on a CPU, and flat shapes need no more depth: ~0.23 M parameters, 8x downsampling, 16 latent channels.
TINY_AE = VAEConfig(resolution=48, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=0, z_channels=16)

# The bundled model works at 48 px: 16-pixel cells, so each 2x2 patch of the 8x-downsampled latent is one
# cell. Pictures of other sizes reach it through the inference resize (64 px renders, the world's default,
# are the common case), so the AE also learns 64 px renders resized to 48 (bicubic, soft edges).
SIZE = 48
RESIZED_FROM = 64


OBJECT_WEIGHT = 4.0


@dataclass(frozen=True)
class AESettings:
    max_steps: int = 1500  # ~4 min on two idle cores; held-out read-back is then exact
    seconds: float = 900.0  # and a wall-clock cap; the learning rate decays over whichever ends first
    batch: int = 8
    lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_ratio: float = 0.05
    kl_weight: float = 1e-5
    crop: int = SIZE  # crop side (whole frames: crops change GroupNorm statistics, which hurt)
    resized_p: float = 0.5  # share of training images rendered at RESIZED_FROM and resized to SIZE


def shown(scene: Scene, resized: bool) -> Image.Image:
    """`scene` at SIZE px, rendered there or rendered at RESIZED_FROM and resized as inference would."""
    if not resized:
        return render(scene, SIZE)
    return resize(render(scene, RESIZED_FROM), ImageLimits(SIZE, SIZE, 16))


def training_images(rng: random.Random, n: int, resized_p: float = 0.0) -> torch.Tensor:
    """(n, 3, SIZE, SIZE) in [-1, 1]: scenes of 1 to 3 objects and navigation views (0 to ~6 objects),
    `resized_p` of them resized from RESIZED_FROM px."""
    images = []
    for _ in range(n):
        if rng.random() < 0.75:
            scene = sample_scene(rng)
        else:
            world = sample_world(rng)
            scene = view(world, (rng.randint(0, 2), rng.randint(0, 2)))
        images.append(to_tensor(shown(scene, rng.random() < resized_p)))
    return torch.stack(images)


def random_crops(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """One size x size crop per image, at offsets on the 8-pixel latent grid (as whole frames are encoded)."""
    if size >= x.shape[-1]:
        return x
    offsets = range(0, x.shape[-1] - size + 1, 8)
    crops = []
    for img in x:
        top, left = rng.choice(offsets), rng.choice(offsets)
        crops.append(img[:, top : top + size, left : left + size])
    return torch.stack(crops)


def _posterior(ae: AutoEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = ae.encoder(x).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def ae_loss(ae: AutoEncoder, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction of a posterior sample (raw latent space, no scale/shift) + weighted KL."""
    mean, logvar = _posterior(ae, x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    y = ae.decoder(z)
    # Objects cover ~10% of a frame: weighting them and the background just around them (dilated by 2 px)
    # keeps colors exact and edges where they are, e.g. a circle's empty corners; the scorer reads both.
    near = F.max_pool2d((x < 0.99).any(dim=1, keepdim=True).float(), 5, stride=1, padding=2)
    weight = 1.0 + OBJECT_WEIGHT * near
    l1, l2 = ((y - x).abs() * weight).mean(), ((y - x).pow(2) * weight).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    loss = l1 + l2 + kl_weight * kl
    return loss, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


@torch.no_grad()
def latent_statistics(ae: AutoEncoder, x: torch.Tensor) -> tuple[float, float]:
    """(shift, scale) with scale * (mean - shift) of unit variance over `x`'s posterior means."""
    mean, _ = _posterior(ae, x)
    return float(mean.mean()), float(1.0 / mean.std())


def train_autoencoder(
    cfg: VAEConfig = TINY_AE,
    settings: AESettings = AESettings(),
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[AutoEncoder, VAEConfig]:
    """Train an AE from scratch; returns it frozen (eval, no grad) and the config with its latent scale."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    ae = AutoEncoder(cfg).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(ae.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = time.monotonic()
    step = 0
    while True:
        # Progress is the larger of the step and time fractions: the run ends on whichever budget is spent.
        progress = max(step / settings.max_steps, (time.monotonic() - start) / settings.seconds)
        if progress >= 1.0:
            break
        lr = warmup_cosine_lr(settings.lr, step, progress, settings.warmup_steps, settings.final_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        x = random_crops(training_images(rng, settings.batch, settings.resized_p), settings.crop, rng)
        x = x.to(memory_format=torch.channels_last)
        loss, parts = ae_loss(ae, x, settings.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log(
                f"ae step {step} t={time.monotonic() - start:.0f}s lr={lr:.2e} "
                + " ".join(f"{k}={v:.4f}" for k, v in parts.items())
            )
    ae = ae.eval().requires_grad_(False).to(memory_format=torch.contiguous_format)
    shift, scale = latent_statistics(ae, training_images(rng, 64))
    log(f"ae done: {step} steps, latent shift {shift:.4f} scale {scale:.4f}")
    cfg = replace(cfg, shift_factor=shift, scale_factor=scale)
    ae.cfg = cfg
    return ae, cfg


@torch.no_grad()
def reconstruction_check(ae: AutoEncoder, n: int = 64, seed: int = 1234) -> dict[str, float]:
    """Held-out reconstruction: mean L1 and the scorer's read-back accuracy of decode(encode(image)), for
    native and resized pictures."""
    from ..images import from_tensor
    from ..shapes import read_scene

    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    report = {}
    for name, resized in (("", False), ("resized_", True)):
        x = torch.stack([to_tensor(shown(s, resized)) for s in scenes])
        y = ae.decode(ae.encode(x))
        right = sum(read_scene(from_tensor(img)) == s for img, s in zip(y, scenes, strict=True))
        report |= {f"{name}l1": float(F.l1_loss(y, x)), f"{name}read_back": right / n}
    return report
