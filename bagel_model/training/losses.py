"""The training objective: one decoder pass over a packed sequence, next-token CE plus rectified-flow MSE.

Official rules (BAGEL_REFERENCE §6.2): each target image draws t = sigmoid(n), n ~ N(0, 1), then the shift
s*t / (1 + (s - 1)*t); its tokens become x_t = (1 - t) x0 + t * noise and the network's `velocity` is
regressed on noise - x0 (MSE: mean over the latent channels, averaged over target tokens). Clean context
latents use t = 0. CE scores the next-token logits at the positions `pack` marks (answer, caption or
thought text and its closing `<|im_end|>`), averaged over those tokens. loss = ce_weight*CE + mse_weight*MSE.

Not here: building sequences (`data.py`), the optimizer or EMA (`trainer.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.decoder import Routing
from ..model import Bagel
from ..sampling import shift_time
from .data import TASKS, Packed


def sample_timesteps(n: int, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) flow times in (0, 1): sigmoid of a standard normal, then the timestep shift."""
    return shift_time(torch.sigmoid(torch.randn(n, generator=generator)), shift)


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t * noise, t (n,) broadcast over the channels of x0 (n, c)."""
    t = t.unsqueeze(-1)
    return (1 - t) * x0 + t * noise


@dataclass
class LossOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    ce_by_task: dict[str, float]
    mse_by_task: dict[str, float]


def _by_task(values: torch.Tensor, task: torch.Tensor) -> dict[str, float]:
    out = {}
    for i, name in enumerate(TASKS):
        sel = task == i
        if bool(sel.any()):
            out[name] = float(values[sel].mean())
    return out


def objective(
    net: Bagel,
    batch: Packed,
    timestep_shift: float = 1.0,
    ce_weight: float = 1.0,
    mse_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Embed every token of `batch`, run the decoder once under the packed mask, and score it."""
    device = net.device
    n, d = batch.length, net.config.llm.hidden_size
    embeds = torch.zeros(n, d, device=device, dtype=net.dtype)
    text_index = batch.text_index.to(device)
    embeds = embeds.index_copy(0, text_index, net.embed_text(batch.ids.to(device)[text_index]))
    if batch.vit_lens:
        vit = net.embed_vit(batch.vit_patches.to(device), batch.vit_pos.to(device), batch.vit_lens)
        embeds = embeds.index_copy(0, batch.vit_index.to(device), vit.to(embeds.dtype))

    mse_tokens = torch.zeros(0, dtype=torch.bool)
    if batch.latents.shape[0]:
        n_images = batch.image_noisy.shape[0]
        t_image = sample_timesteps(n_images, timestep_shift, generator) * batch.image_noisy
        t = t_image[batch.latent_image]  # (k,) 0 for clean context images
        mse_tokens = batch.image_noisy[batch.latent_image]
        x0 = batch.latents
        noise = torch.randn(x0.shape, generator=generator)
        x = torch.where(mse_tokens.unsqueeze(1), noised(x0, t, noise), x0)
        lat = net.embed_latents(x.to(device), t.to(device), batch.latent_pos.to(device))
        embeds = embeds.index_copy(0, batch.latent_index.to(device), lat.to(embeds.dtype))

    routing = Routing.from_mask(batch.is_gen.to(device))
    hidden = net(embeds, batch.positions.to(device), routing, None, causal=False, mask=batch.mask.to(device))

    zero = hidden.new_zeros(())
    ce, ce_by_task = zero, {}
    if batch.ce_index.numel():
        logits = net.logits(hidden[batch.ce_index.to(device)]).float()
        ce_tok = F.cross_entropy(logits, batch.ce_labels.to(device), reduction="none")
        ce = ce_tok.mean()
        ce_by_task = _by_task(ce_tok.detach().cpu(), batch.ce_task)
    mse, mse_by_task = zero, {}
    if bool(mse_tokens.any()):
        index = batch.latent_index[mse_tokens].to(device)
        v = net.velocity(hidden[index]).float()
        target = (noise - x0)[mse_tokens].to(device)
        mse_tok = (v - target).pow(2).mean(dim=-1)
        mse = mse_tok.mean()
        token_task = batch.image_task[batch.latent_image][mse_tokens]
        mse_by_task = _by_task(mse_tok.detach().cpu(), token_task)
    loss = ce_weight * ce + mse_weight * mse
    return LossOutput(loss, ce.detach(), mse.detach(), ce_by_task, mse_by_task)
