"""The FLUX autoencoder BAGEL uses to move images in and out of its 16-channel latent space.

Images are (b, 3, H, W) in [-1, 1]; latents are (b, z, H/8, W/8), already scaled and shifted the way the
diffusion side of BAGEL expects them (`scale_factor * (mean - shift_factor)`). H and W should be multiples of
8 (BAGEL itself only uses multiples of 16).

Module and attribute names mirror the FLUX `ae.safetensors` keys (`encoder.down.{i}.block.{j}.conv1`, ...),
so a checkpoint loads with no key table at all. Shapes: b batch, c channels, h/w latent or feature rows and
columns, n = h * w positions.

Deliberately not here:
- sampling the posterior: `encode` returns the posterior mean (see `AutoEncoder.encode`);
- converting to and from PIL images or uint8, resizing, tiling;
- reading files or assigning weights: the loader builds this module on the `meta` device and assigns
  tensors; construction does no work beyond the `torch.nn` defaults;
- choosing a dtype or device: every operation follows the input's, fp32 and bf16 alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VAEConfig
from .ops import TORCH, Ops


def _norm(c: int, ops: Ops) -> nn.Module:
    return ops.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


def _conv3(c_in: int, c_out: int, ops: Ops) -> nn.Module:
    return ops.Conv2d(c_in, c_out, kernel_size=3, padding=1)


class ResnetBlock(nn.Module):
    """norm, swish, conv, twice, plus a residual; a 1x1 `nin_shortcut` only where the width changes."""

    def __init__(self, c_in: int, c_out: int, ops: Ops = TORCH):
        super().__init__()
        self.norm1 = _norm(c_in, ops)
        self.conv1 = _conv3(c_in, c_out, ops)
        self.norm2 = _norm(c_out, ops)
        self.conv2 = _conv3(c_out, c_out, ops)
        self.nin_shortcut = ops.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h * w positions, with 1x1 convolutions as projections."""

    def __init__(self, c: int, ops: Ops = TORCH):
        super().__init__()
        self.norm = _norm(c, ops)
        self.q = ops.Conv2d(c, c, kernel_size=1)
        self.k = ops.Conv2d(c, c, kernel_size=1)
        self.v = ops.Conv2d(c, c, kernel_size=1)
        self.proj_out = ops.Conv2d(c, c, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        q, k, v = (p(x_norm).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # (b, 1, n, c)
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Halve h and w: zero-pad one row at the bottom and one column at the right, then a stride-2 conv."""

    def __init__(self, c: int, ops: Ops = TORCH):
        super().__init__()
        self.conv = ops.Conv2d(c, c, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, c: int, ops: Ops = TORCH):
        super().__init__()
        self.conv = _conv3(c, c, ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The bottleneck both halves share in structure: resnet, attention, resnet at constant width."""

    def __init__(self, c: int, ops: Ops = TORCH):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, ops)
        self.attn_1 = AttnBlock(c, ops)
        self.block_2 = ResnetBlock(c, c, ops)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution: `n_blocks` resnets to width `c_out`, then a `downsample` unless last."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, downsample: bool, ops: Ops = TORCH):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in if j == 0 else c_out, c_out, ops) for j in range(n_blocks)
        )
        self.downsample = Downsample(c_out, ops) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: `n_blocks` resnets to width `c_out`, then an `upsample` unless level 0."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, upsample: bool, ops: Ops = TORCH):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in if j == 0 else c_out, c_out, ops) for j in range(n_blocks)
        )
        self.upsample = Upsample(c_out, ops) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """(b, in_channels, H, W) -> (b, 2 * z_channels, H/8, W/8): posterior mean and log-variance, stacked."""

    def __init__(self, cfg: VAEConfig, ops: Ops = TORCH):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = _conv3(cfg.in_channels, cfg.ch, ops)
        self.down = nn.ModuleList(
            DownLevel(c_in, c_out, cfg.num_res_blocks, downsample=i != last, ops=ops)
            for i, (c_in, c_out) in enumerate(zip([cfg.ch, *widths[:-1]], widths, strict=True))
        )
        self.mid = MidBlock(widths[-1], ops)
        self.norm_out = _norm(widths[-1], ops)
        self.conv_out = _conv3(widths[-1], 2 * cfg.z_channels, ops)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(b, z_channels, h, w) unscaled latent -> (b, out_ch, 8h, 8w) image.

    `up[i]` works at the same resolution as the encoder's `down[i]` (FLUX numbering), so the levels run
    from the last index to 0; each has one more resnet than its encoder counterpart.
    """

    def __init__(self, cfg: VAEConfig, ops: Ops = TORCH):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = _conv3(cfg.z_channels, widths[-1], ops)
        self.mid = MidBlock(widths[-1], ops)
        self.up = nn.ModuleList(
            UpLevel(c_in, c_out, cfg.num_res_blocks + 1, upsample=i > 0, ops=ops)
            for i, (c_in, c_out) in enumerate(zip([*widths[1:], widths[-1]], widths, strict=True))
        )
        self.norm_out = _norm(widths[0], ops)
        self.conv_out = _conv3(widths[0], cfg.out_ch, ops)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """The FLUX autoencoder with BAGEL's latent scaling. No parameters or buffers beyond the checkpoint's."""

    def __init__(self, cfg: VAEConfig, ops: Ops = TORCH):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, ops)
        self.decoder = Decoder(cfg, ops)
        self._execution: torch.device | None = None  # see `place`

    def place(self, execution: torch.device) -> None:
        """Run on `execution` although a memory manager may keep weights elsewhere between forwards."""
        self._execution = execution

    @property
    def device(self) -> torch.device:
        """Where inputs must be: the placed execution device, else where the weights are."""
        return self._execution or self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (inputs must be cast to it)."""
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: Tensor) -> Tensor:
        """(b, 3, H, W) in [-1, 1] -> scaled latent (b, z, H/8, W/8).

        We deliberately return the posterior *mean*, not a sample: the official code (FLUX's
        `DiagonalGaussian(sample=True)`) adds `exp(logvar / 2) * randn` noise, so a context image would
        encode differently on every run and encoding would consume the global RNG. With the mean, a
        context image encodes the same way every time and generation seeds stay independent of it.
        """
        mean, _logvar = self.encoder(x).chunk(2, dim=1)
        return self.from_raw(mean)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (b, z, h, w) -> image (b, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.to_raw(z))

    def to_raw(self, z: Tensor) -> Tensor:
        """Scaled latents (what BAGEL's diffusion side uses) -> the autoencoder's raw latent space, which is
        what ComfyUI's LATENT holds for FLUX (its VAE nodes encode to and decode from it)."""
        return z / self.cfg.scale_factor + self.cfg.shift_factor

    def from_raw(self, raw: Tensor) -> Tensor:
        """The inverse of `to_raw`."""
        return self.cfg.scale_factor * (raw - self.cfg.shift_factor)
