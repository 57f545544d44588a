"""ComfyUI LATENT to the model's latents and back: the only place the nodes convert latents.

A LATENT is `{"samples": [B, C, H/8, W/8]}` in the autoencoder's raw latent space: what ComfyUI's VAE
Encode writes and VAE Decode reads. BAGEL samples in a scaled and shifted copy of that space; the model's
autoencoder converts between the two with its own scale and shift (for BAGEL-7B-MoT's FLUX autoencoder,
ComfyUI's FLUX latent format: 0.3611 and 0.1159), so a BAGEL LATENT decodes with ComfyUI's VAE Decode and the
FLUX ae.safetensors, and a FLUX LATENT from VAE Encode is what BAGEL would have encoded.
"""

from __future__ import annotations

import torch

from ..bagel_model import BagelModel

LATENT = "LATENT"


def to_latent(model: BagelModel, latents: torch.Tensor) -> dict:
    """A LATENT from latents (B, z, H/8, W/8) in the model's scaled space."""
    return {"samples": model.vae.to_raw(latents.float().cpu())}


def from_latent(model: BagelModel, latent: dict, what: str = "latent") -> torch.Tensor:
    """The model's scaled latents (B, z, H/8, W/8) from a LATENT of this model's autoencoder."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] < 1:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(
            f"{what} must be a ComfyUI LATENT of images, samples [batch, channels, height/8, width/8]; "
            f"got {shape}"
        )
    channels = model.config.latent_channels
    if samples.shape[1] != channels:
        raise ValueError(
            f"{what} has {samples.shape[1]} channels, but this model's autoencoder has {channels}: connect a "
            "LATENT from a BAGEL node, or from VAE Encode with the model's own autoencoder (BAGEL-7B-MoT: "
            "FLUX's ae.safetensors)"
        )
    return model.vae.from_raw(samples.float().cpu())
