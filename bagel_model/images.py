"""Pixels in and out of the model, and every patch layout.

Two jobs that meet at the image boundary:
- PIL <-> tensor: the official preprocessing (`pil_img2rgb`, `MaxLongEdgeMinShortEdgeResize`, ToTensor +
  Normalize(0.5, 0.5)) and decoding rule, restated with PIL alone (no torchvision);
- patch layouts: how an image (c, H, W) becomes a row-major sequence of p x p patches with features in
  (py, px, c) order, for the ViT pixels (p = 14) and the VAE latents (p = 2) alike, and the position ids
  of those patches in a square table.

This is the only library module that touches PIL. It knows nothing of models, weights, or devices other
than returning CPU tensors; the VAE and the ViT consume what it produces.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import ImageLimits

# ---------------------------------------------------------------------------------------------------------
# PIL side


def _check_size(image: Image.Image) -> None:
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has zero size ({image.width}x{image.height})")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`. Transparency (an RGBA image, or any image with a transparency key) is
    composited onto white, as the official `pil_img2rgb` does; every other mode is plainly converted
    (so an "LA" image loses its alpha without compositing, as in the official code)."""
    _check_size(image)
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def _make_divisible(value: float, stride: int) -> int:
    # Python's round() is banker's rounding; the official code relies on it.
    return max(stride, int(round(value / stride) * stride))


def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def resize_dims(width: int, height: int, limits: ImageLimits, img_num: int = 1) -> tuple[int, int]:
    """(new_width, new_height) of the official `MaxLongEdgeMinShortEdgeResize`.

    Shrink the long edge to `max_size` (never enlarge for it), then enlarge so the short edge reaches
    `min_size` (this wins over the first rule); round each side to a multiple of `stride`. Then, if the
    area exceeds `max_pixels / img_num`, scale down to that area, and if the long edge still exceeds
    `max_size`, scale it down to it, rounding to the stride after each step.
    """
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize an image of zero size ({width}x{height})")
    if img_num < 1:
        raise ValueError(f"img_num must be at least 1, got {img_num}")
    s = limits.stride
    scale = min(limits.max_size / max(width, height), 1.0)
    scale = max(scale, limits.min_size / min(width, height))
    w, h = _scaled(width, height, scale, s)
    budget = limits.max_pixels / img_num
    if w * h > budget:
        w, h = _scaled(w, h, budget / (w * h), s)
    if max(w, h) > limits.max_size:
        w, h = _scaled(w, h, limits.max_size / max(w, h), s)
    return w, h


def resize(image: Image.Image, limits: ImageLimits, img_num: int = 1) -> Image.Image:
    """Resize to `resize_dims` with PIL's bicubic filter. This is what the official torchvision
    `F.resize(pil_image, size, BICUBIC, antialias=True)` does for a PIL input: it hands the image to
    `PIL.Image.resize` (which always antialiases), or returns it unchanged when the size already matches."""
    _check_size(image)
    size = resize_dims(image.width, image.height, limits, img_num)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def prepare_context_image(
    image: Image.Image, vae_limits: ImageLimits, vit_limits: ImageLimits
) -> tuple[Image.Image, Image.Image]:
    """(vae_image, vit_image) for one context image, by the official inferencer's order of operations.

    The inferencer first makes the image RGB and resizes it by the *VAE* rule, for every input image
    (understanding included). The VAE then sees that image (its transform resizes it again, which keeps the
    size: `resize_dims` is idempotent for the official limits, as a test checks over a sweep of sizes), and
    the ViT sees the ViT resize of the already VAE-resized image, not of the original. An edit's output size
    is `vae_image.size`.
    """
    vae_image = resize(to_rgb(image), vae_limits)
    return vae_image, resize(vae_image, vit_limits)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]: ToTensor (x / 255) then Normalize(0.5, 0.5), in that order so the
    values are bit-identical to the official ones. A non-RGB image goes through `to_rgb` first."""
    _check_size(image)
    if image.mode != "RGB":
        image = to_rgb(image)
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # (H, W, 3)
    return x.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def from_tensor(x: torch.Tensor) -> Image.Image:
    """PIL RGB image of a (3, H, W) tensor in [-1, 1], by the official decode rule: clamp (x + 1) / 2 to
    [0, 1], scale by 255 and truncate (not round) to uint8. Computed in float32 whatever x's dtype."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(x.shape)}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"image tensor has zero size {tuple(x.shape)}")
    pixels = (x.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
    return Image.fromarray(pixels.to(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------------------
# Patch layouts (b: none, one image at a time; c channels; p patch side; h, w patches per column / row)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(c, h*p, w*p) -> (h*w, p*p*c): row-major patches, features ordered (py, px, c).

    The ViT uses it on pixels with p = 14 ((3, H, W) -> (n, 588)); the generation side on VAE latents with
    p = 2 ((16, 2h, 2w) -> (h*w, 64)).
    """
    if x.ndim != 3:
        raise ValueError(f"patchify expects (c, H, W), got shape {tuple(x.shape)}")
    c, height, width = x.shape
    if height % p or width % p:
        raise ValueError(f"size {height}x{width} is not divisible by the patch size {p}")
    h, w = height // p, width // p
    x = x.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0)  # (h, w, py, px, c)
    return x.reshape(h * w, p * p * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Inverse of `patchify`: (h*w, p*p*c) -> (c, h*p, w*p). Used to turn generated latent tokens back
    into the VAE's latent image."""
    if tokens.shape != (h * w, p * p * c):
        raise ValueError(
            f"expected tokens of shape ({h * w}, {p * p * c}) for h={h}, w={w}, p={p}, c={c}, "
            f"got {tuple(tokens.shape)}"
        )
    x = tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3)  # (c, h, py, w, px)
    return x.reshape(c, h * p, w * p)


def flattened_position_ids(h_patches: int, w_patches: int, max_per_side: int) -> torch.Tensor:
    """(h*w,) int64 ids into a (max_per_side^2)-row position table: row r, column c -> r*max_per_side + c,
    in the row-major order of `patchify` (the official "extrapolate" ids: no interpolation)."""
    if h_patches < 1 or w_patches < 1:
        raise ValueError(f"need at least one patch per side, got {h_patches}x{w_patches}")
    if h_patches > max_per_side or w_patches > max_per_side:
        raise ValueError(
            f"{h_patches}x{w_patches} patches exceed the position table's {max_per_side} per side"
        )
    rows = torch.arange(h_patches).unsqueeze(1) * max_per_side
    return (rows + torch.arange(w_patches)).flatten()
