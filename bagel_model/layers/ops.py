"""The layer classes every BAGEL module is built from, injectable.

`Ops` names one class per kind of weighted layer. The default is torch.nn (plus BAGEL's Qwen2 RMSNorm); a
host can pass its own classes that hold the same parameters and compute the same thing, e.g. ComfyUI's
`comfy.ops` layers, which cast their weights to the input's device for each forward so that ComfyUI's
memory manager can leave part of the model off the GPU. The library never imports a host: `nodes/` builds
the ComfyUI set and passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm (`rms_norm`); a host's subclass may bring the weight to the input's device in its
    forward."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass(frozen=True)
class Ops:
    """Constructors of the weighted layers, called like their torch.nn counterparts."""

    Linear: type[nn.Module] = nn.Linear
    Embedding: type[nn.Module] = nn.Embedding
    LayerNorm: type[nn.Module] = nn.LayerNorm
    Conv2d: type[nn.Module] = nn.Conv2d
    GroupNorm: type[nn.Module] = nn.GroupNorm
    RMSNorm: type[nn.Module] = RMSNorm


TORCH = Ops()
