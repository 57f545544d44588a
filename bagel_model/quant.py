"""Weight storage modes: keep the decoder's linear weights in float8 and compute in the activation dtype.

BAGEL-7B-MoT's 29 GB of bf16 weights do not fit a 24 GB card; both experts are touched at every
denoising step, so offloading one of them costs a PCIe transfer per step. Storing the decoder's linear
weights as float8 (e4m3, one scale per output row) halves them to about 15 GB, and each layer dequantizes
its own weight just before its matmul, so no more than one layer's bf16 weight exists at a time.

What this does not do: quantize activations or use fp8 matmul kernels (the result is a bf16 matmul on
dequantized weights, so any GPU and the CPU can run it), or touch embeddings, norms, the ViT or the AE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_MODES = ("native", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class Fp8Linear(nn.Module):
    """A bias-optional linear layer whose weight is stored as float8 with a per-row float32 scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_fp8", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision (out, in) weight into this layer, on the weight's device."""
        w = weight.float()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        self.weight_fp8 = (w / scale).to(FP8)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_fp8.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def fp8_targets(net: nn.Module) -> list[str]:
    """Names of the linear layers stored in fp8: every decoder linear (both experts) and the LM head."""
    lm = net.language_model
    names = [f"language_model.model.{n}" for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)]
    return [*names, "language_model.lm_head"]


def use_fp8(net: nn.Module) -> set[str]:
    """Swap the target linears of a (meta-built) network for `Fp8Linear`s; returns their weight keys,
    which the loader then routes through `Fp8Linear.store`."""
    keys = set()
    for name in fp8_targets(net):
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        old = getattr(parent, leaf)
        with torch.device("meta"):
            setattr(parent, leaf, Fp8Linear(old.in_features, old.out_features, old.bias is not None))
        keys.add(f"{name}.weight")
    return keys
