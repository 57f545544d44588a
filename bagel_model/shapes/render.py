"""Scenes to pixels: the one place that decides what a shapes-world image looks like.

Each object gets a whole-pixel square box (side = 2/3 of the cell, rounded, centred in the cell to within
half a pixel), and the shape is inscribed in that box by testing each pixel's centre against the exact
geometry. Snapping the box to the pixel grid keeps the shape's pixel bounding box equal to the box, so the
fill ratios the scorer reads (square 1, circle ~pi/4, triangle ~1/2) hold even at 48 px, where a free
circle would lose its rim and look square. The picture is a pure function of (scene, size): no
anti-aliasing, no drawing-library version in the loop. This module does not read images back; that is
`scorer.py`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .scene import COLORS, GRID, Scene, cell_position

BACKGROUND = (255, 255, 255)
OBJECT_SCALE = 2 / 3  # object side as a fraction of the cell side


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Which offsets (dx, dy) from the box centre fall in the shape inscribed in a box of half-side `half`.

    Fill ratios of the box: 1 (square), pi/4 (circle), 1/2 (triangle); the scorer tells shapes apart by them.
    """
    if shape == "square":
        return (np.abs(dx) < half) & (np.abs(dy) < half)
    if shape == "circle":
        return dx**2 + dy**2 < half**2
    if shape == "triangle":  # upright: apex at the top centre, base along the bottom edge
        return (dy < half) & (np.abs(dx) < (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """A size×size RGB image of the scene: white background, each object filled in its cell."""
    if not isinstance(size, int) or size <= 0 or size % 16:  # 16: the VAE stride, so no padding is needed
        raise ValueError(f"image size must be a positive multiple of 16, got {size!r}")
    pixels = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    centres = np.arange(size) + 0.5
    cell = size / GRID
    side = round(cell * OBJECT_SCALE)
    for obj in scene.objects:
        row, col = cell_position(obj.cell)
        top = math.floor((row + 0.5) * cell - side / 2 + 0.5)
        left = math.floor((col + 0.5) * cell - side / 2 + 0.5)
        dy = centres[:, None] - (top + side / 2)
        dx = centres[None, :] - (left + side / 2)
        pixels[_shape_mask(obj.shape, dx, dy, side / 2)] = COLORS[obj.color]
    return Image.fromarray(pixels)
