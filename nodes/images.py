"""ComfyUI IMAGE tensors to PIL images and back: the only place the nodes convert pixels.

IMAGE is a float tensor [B, H, W, C] in 0..1 with C = 3 (1 and 4 are read as grey and RGBA; the library
composites RGBA onto white as the official code does). An input that takes one image refuses a batch of
several with a way out, never silently cutting it to its first image; inputs that take a batch read every
image of it, in order.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pils(image: torch.Tensor, what: str = "images") -> list[Image.Image]:
    """Every image of an IMAGE batch as a PIL image, in batch order."""
    if image.ndim != 4 or image.shape[-1] not in _MODES or image.shape[0] < 1:
        raise ValueError(
            f"{what} must be a ComfyUI IMAGE of shape [batch, height, width, 1/3/4 channels], "
            f"got {list(image.shape)}"
        )
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return [Image.fromarray(item, _MODES[image.shape[-1]]) for item in pixels]


def to_pil(image: torch.Tensor, what: str = "image") -> Image.Image:
    """One PIL image from an IMAGE tensor holding exactly one image."""
    pils = to_pils(image, what)
    if len(pils) != 1:
        raise ValueError(
            f"{what} is a batch of {len(pils)} images; BAGEL takes one image here. Pick one with "
            "the ImageFromBatch node (its batch_index input), or run the images one at a time."
        )
    return pils[0]


def to_image(images: list[Image.Image]) -> torch.Tensor:
    """An IMAGE batch [B, H, W, 3] float32 in 0..1 from PIL images of one size."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"cannot batch images of different sizes {sorted(sizes)}")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))
