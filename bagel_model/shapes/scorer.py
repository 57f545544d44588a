"""Pixels back to a scene: the scorer that grades generated images.

Per cell, pixels far enough from white are ink; enough ink means an object. Its mask is the ink above half
of the object's peak distance from white (the half-maximum edge, which a symmetric blur leaves where the
sharp edge was), its mean color picks the nearest of the five colors, and its fill ratio inside its
bounding box picks the shape (square 1, circle pi/4, triangle 1/2). The thresholds are loose enough for the
blur, noise and color drift of a small generator and exact on `render` output at every size (16 px up).

This module does not grade (compare scenes): that is `grading.py`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .scene import COLORS, GRID, Obj, Scene, cell_name

# Distance from white (Euclidean, RGB 0..255) above which a pixel counts as ink. The palette's closest
# color to white (yellow) is 223 away; an off-white background (240) with noise of sigma 16 stays below.
INK_DISTANCE = 80.0
# Ink covering less than this fraction of a cell is a smudge, not an object; the smallest object
# (a triangle, 2/3 x 2/3 x 1/2 of the cell) covers about 0.22.
MIN_INK_FRACTION = 0.05
# The object's mask is the ink above half of its peak distance from white (the 90th percentile of its ink,
# so a few noisy pixels do not set it): a symmetric blur leaves the half-maximum contour on the sharp edge.
EDGE_LEVEL = 0.5
PEAK_QUANTILE = 0.9
# Ideal fill ratios are 1 (square), pi/4 ~ 0.785 (circle) and 1/2 (triangle). Blur rounds the triangle's
# apex away, which shrinks its box and raises its ratio (up to 0.67 at blur sigma 1.5 px on a 64 px image),
# and rounds the square's corners (down to 0.86 at sigma 2 px on 128 px), while circles stay within
# 0.72..0.82; so the cuts sit at 0.70 and 0.85 rather than at the midpoints 0.64 and 0.89.
SQUARE_MIN_FILL = 0.85
CIRCLE_MIN_FILL = 0.7

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An (h, w, 3) float array in 0..255 from a PIL image or an (h, w, 3) array already in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) RGB array in 0..255, got shape {pixels.shape}")
    return pixels


def _cell_bounds(length: int) -> list[int]:
    """Where each of the 3 cells starts along an axis: a pixel belongs to the cell its centre falls in."""
    labels = np.floor((np.arange(length) + 0.5) * GRID / length).astype(int)
    return [int(np.searchsorted(labels, k)) for k in range(GRID + 1)]


def _has_neighbour(mask: np.ndarray) -> np.ndarray:
    """Pixels with at least one of their four neighbours set."""
    padded = np.pad(mask, 1)
    return padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _read_cell(pixels: np.ndarray) -> tuple[str, str] | None:
    """(color, shape) of the object in one cell's pixels, or None when the cell is empty."""
    distance = np.sqrt(((255.0 - pixels) ** 2).sum(axis=-1))
    ink = distance > INK_DISTANCE
    if ink.sum() < MIN_INK_FRACTION * distance.size:
        return None
    mask = distance > EDGE_LEVEL * np.quantile(distance[ink], PEAK_QUANTILE)
    mask &= _has_neighbour(mask)  # a lone noisy pixel would stretch the bounding box
    if not mask.any():  # scattered speckle, no solid region
        return None
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    shape = "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"
    mean = pixels[mask].mean(axis=0)
    color = _PALETTE_NAMES[int(np.argmin(((_PALETTE - mean) ** 2).sum(axis=-1)))]
    return color, shape


def read_scene(image: Image.Image | np.ndarray) -> Scene:
    """The scene an image shows, read cell by cell (any size; rendered images read back exactly)."""
    pixels = _pixels(image)
    ys, xs = _cell_bounds(pixels.shape[0]), _cell_bounds(pixels.shape[1])
    objects = []
    for row in range(GRID):
        for col in range(GRID):
            found = _read_cell(pixels[ys[row] : ys[row + 1], xs[col] : xs[col + 1]])
            if found is not None:
                objects.append(Obj(*found, cell_name(row, col)))
    return Scene(tuple(objects))
