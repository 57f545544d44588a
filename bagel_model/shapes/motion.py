"""Motion sequences: one object slides to the edge of the grid, one cell per frame.

The frames start with the scene as given, so frame 0 is the conditioning image and the rest are what a
MultiFrame generation must produce. Other objects never move, and a path through another object is refused
rather than resolved, because the spec defines no collisions. This module knows nothing of pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .language import kind_is_unique
from .scene import DIRECTIONS, GRID, Obj, Scene, cell_name, cell_position, check_direction


@dataclass(frozen=True)
class Motion:
    instruction: str  # e.g. "the red circle moves right"
    frames: tuple[Scene, ...]


def _path(obj: Obj, direction: str) -> list[str]:
    """Cells the object passes through, in order, up to and including the edge cell."""
    (row, col), (dr, dc) = cell_position(obj.cell), check_direction(direction)
    cells = []
    while 0 <= row + dr < GRID and 0 <= col + dc < GRID:
        row, col = row + dr, col + dc
        cells.append(cell_name(row, col))
    return cells


def motion_frames(scene: Scene, mover: Obj, direction: str) -> tuple[Scene, ...]:
    """The scene, then one frame per step of `mover` towards `direction` until it reaches the edge."""
    if mover not in scene.objects:
        raise ValueError(f"{mover} is not in the scene")
    frames, current = [scene], mover
    for cell in _path(mover, direction):
        if scene.at(cell) is not None:
            raise ValueError(f"the path of {mover} to the {direction} is blocked at the {cell}")
        moved = Obj(mover.color, mover.shape, cell)
        frames.append(frames[-1].replace(current, moved))
        current = moved
    return tuple(frames)


def sample_motion(scene: Scene, rng: random.Random) -> Motion | None:
    """A random motion of an unambiguously named object with at least one free step, or None."""
    options = [
        (obj, direction)
        for obj in scene.objects
        if kind_is_unique(scene, obj)
        for direction in DIRECTIONS
        if (path := _path(obj, direction)) and all(scene.at(cell) is None for cell in path)
    ]
    if not options:
        return None
    obj, direction = rng.choice(options)
    return Motion(f"the {obj.color} {obj.shape} moves {direction}", motion_frames(scene, obj, direction))
