"""Weight storage modes for the decoder's linear layers (both experts and the LM head).

BAGEL-7B-MoT's 29 GB of bf16 weights do not fit a 24 GB card; both experts are touched at every
denoising step, so offloading one of them costs a PCIe transfer per step. Quantized storage keeps all of
them on the card instead:

- "fp8": float8 e4m3 with one scale per output row (about 15 GB). Each layer dequantizes its own weight
  just before a matmul in the activation dtype, so any GPU and the CPU run it and no more than one layer's
  bf16 weight exists at a time. Written here: it is a dozen lines and needs no package.
- "nf4" (4-bit NormalFloat, blocks of 64) and "int8" (LLM.int8 with outlier columns): bitsandbytes' own
  layers and kernels, where that package is installed; nothing of theirs is re-implemented here.

What this does not do: quantize activations, or touch embeddings, norms, the ViT or the AE.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_MODES = ("native", "fp8", "nf4", "int8")
BNB_MODES = ("nf4", "int8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class QuantizedLinear(nn.Module):
    """A linear layer that stores its weight in its own format: a checkpoint's `weight` goes through
    `store`, its `bias` is kept as it is. Both arrive through PyTorch's loading hook
    (`_load_from_state_dict`), as for every other layer, so the loader needs no special path for them."""

    bias: nn.Parameter | None

    def store(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        names = {f"{prefix}weight"} | ({f"{prefix}bias"} if self.bias is not None else set())
        missing_keys.extend(sorted(names - set(state_dict)))
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in names)
        if f"{prefix}weight" in state_dict:
            self.store(state_dict[f"{prefix}weight"])
        if f"{prefix}bias" in names and f"{prefix}bias" in state_dict:
            self.bias = nn.Parameter(state_dict[f"{prefix}bias"], requires_grad=False)


class Fp8Linear(QuantizedLinear):
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


class BnbLinear(QuantizedLinear):
    """A bitsandbytes nf4 or int8 linear layer, plus the `store` the loader fills quantized layers with.

    The bias stays outside, in the activation dtype: the checkpoint's bias keys load as they are."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, dtype: torch.dtype):
        super().__init__()
        bnb = bitsandbytes()
        self.mode = mode
        if mode == "nf4":
            self.inner = bnb.nn.Linear4bit(
                in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4"
            )
        else:
            self.inner = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision (out, in) weight on its device (bitsandbytes quantizes on `.to`)."""
        bnb = bitsandbytes()
        if self.mode == "nf4":
            param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64)
        else:
            param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        self.inner.weight = param.to(weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' int8 kernels want rows: a single token's (D,) hidden state is given as (1, D)
        out = self.inner(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def bitsandbytes():
    """The bitsandbytes module, or an error saying how to get it (it is optional, never a requirement)."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            "weights 'nf4' and 'int8' need the bitsandbytes package: pip install bitsandbytes "
            "(or use weights 'fp8', which needs nothing)"
        ) from e
    return bitsandbytes


def quiet_int8_cast_warnings() -> None:
    """Silence bitsandbytes' int8 warning about casting non-fp16 inputs.

    Its int8 matmul logs a warning on every call whose input is not fp16; it casts bf16/fp32 inputs, as
    intended here, so a generated image prints thousands of identical lines. Logging is the application's
    to configure: entry points that load "int8" weights (the CLI, the ComfyUI loader) call this."""
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def is_quantized(module: nn.Module) -> bool:
    """Whether any layer of `module` stores its weights quantized (fp8, nf4 or int8)."""
    return any(isinstance(m, QuantizedLinear) for m in module.modules())


def quantized_targets(net: nn.Module) -> list[str]:
    """Names of the linear layers stored quantized: every decoder linear (both experts) and the LM head."""
    lm = net.language_model
    names = [f"language_model.model.{n}" for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)]
    return [*names, "language_model.lm_head"]


def quantize_linears(net: nn.Module, mode: str, dtype: torch.dtype) -> set[str]:
    """Swap the target linears of a (meta-built) network for quantized ones of `mode` computing in
    `dtype`; returns their weight keys, which the loader hands over as read (each layer's `store`
    converts it)."""
    keys = set()
    for name in quantized_targets(net):
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        old = getattr(parent, leaf)
        bias = old.bias is not None
        with torch.device("meta"):
            if mode == "fp8":
                new = Fp8Linear(old.in_features, old.out_features, bias)
            else:
                new = BnbLinear(old.in_features, old.out_features, bias, mode, dtype)
        setattr(parent, leaf, new)
        keys.add(f"{name}.weight")
    return keys
