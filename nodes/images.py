"""ComfyUI IMAGE tensors to PIL images and back: the only place the nodes convert pixels.

IMAGE is a float tensor [B, H, W, C] in 0..1 with C = 3 (1 and 4 are read as grey and RGBA; the library
composites RGBA onto white as the official code does). Each BAGEL image input is one image, so a batch of
several is refused with a way out, never silently cut to its first image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pil(image: torch.Tensor, what: str = "image") -> Image.Image:
    """One PIL image from an IMAGE tensor holding exactly one image."""
    if image.ndim != 4 or image.shape[-1] not in _MODES:
        raise ValueError(
            f"{what} must be a ComfyUI IMAGE of shape [batch, height, width, 1/3/4 channels], "
            f"got {list(image.shape)}"
        )
    if image.shape[0] != 1:
        raise ValueError(
            f"{what} is a batch of {image.shape[0]} images; BAGEL takes one image here. Pick one with "
            "the ImageFromBatch node (its batch_index input), or run the images one at a time."
        )
    pixels = (image[0].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels, _MODES[image.shape[-1]])


def to_image(images: list[Image.Image]) -> torch.Tensor:
    """An IMAGE batch [B, H, W, 3] float32 in 0..1 from PIL images of one size."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"cannot batch images of different sizes {sorted(sizes)}")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))
