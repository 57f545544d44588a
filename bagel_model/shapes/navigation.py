"""Navigation: a 5×5-cell world seen through a 3×3 window that moves one cell at a time.

`move right` shifts the window one cell right, so the view's content slides left; cells that stay in view
keep their objects and the newly revealed column or row shows whatever the map holds there. A view is an
ordinary `Scene`, so it renders, describes and scores like any other. This module knows nothing of pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scene import COLORS, GRID, SHAPES, Obj, Scene, cell_name, check_direction, check_name

MAP_SIZE = 5
MOVES = ("move left", "move right", "move up", "move down")
Window = tuple[int, int]  # (row, column) of the view's top-left cell on the map


def move_step(move: str) -> tuple[int, int]:
    """The (row, column) shift of the window for a move instruction such as "move left"."""
    check_name("move", move, MOVES)
    return check_direction(move.removeprefix("move "))


@dataclass(frozen=True)
class MapObj:
    color: str
    shape: str
    row: int
    col: int

    def __post_init__(self) -> None:
        check_name("color", self.color, COLORS)
        check_name("shape", self.shape, SHAPES)
        if not (0 <= self.row < MAP_SIZE and 0 <= self.col < MAP_SIZE):
            raise ValueError(f"map position ({self.row}, {self.col}) is outside the 5x5 map")


@dataclass(frozen=True)
class WorldMap:
    """Objects on the 5×5 map, at most one per cell, kept in reading order (so equality is order-free)."""

    objects: tuple[MapObj, ...] = ()

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects, key=lambda o: (o.row, o.col)))
        positions = [(o.row, o.col) for o in objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"more than one object at a map position in {positions}")
        object.__setattr__(self, "objects", objects)


def sample_world(rng: random.Random, min_objects: int = 4, max_objects: int = 8) -> WorldMap:
    """A random map; 4..8 objects on 25 cells puts about 1 to 3 objects in a typical view."""
    if not 0 <= min_objects <= max_objects <= MAP_SIZE * MAP_SIZE:
        raise ValueError(f"need 0 <= min_objects <= max_objects <= 25, got {min_objects} and {max_objects}")
    count = rng.randint(min_objects, max_objects)
    positions = rng.sample([(r, c) for r in range(MAP_SIZE) for c in range(MAP_SIZE)], count)
    return WorldMap(tuple(MapObj(rng.choice(list(COLORS)), rng.choice(SHAPES), r, c) for r, c in positions))


def _fits(window: Window) -> bool:
    return all(0 <= w <= MAP_SIZE - GRID for w in window)


def _check_window(window: Window) -> None:
    if not _fits(window):
        raise ValueError(f"window {window} does not fit the {MAP_SIZE}x{MAP_SIZE} map")


def view(world: WorldMap, window: Window) -> Scene:
    """The 3×3 scene seen with the window's top-left corner at `window`."""
    _check_window(window)
    top, left = window
    return Scene(
        tuple(
            Obj(o.color, o.shape, cell_name(o.row - top, o.col - left))
            for o in world.objects
            if top <= o.row < top + GRID and left <= o.col < left + GRID
        )
    )


def _shifted(window: Window, move: str) -> Window:
    dr, dc = move_step(move)
    return window[0] + dr, window[1] + dc


def move_window(window: Window, move: str) -> Window:
    """The window after a move; a ValueError when it would leave the map."""
    _check_window(window)
    moved = _shifted(window, move)
    if not _fits(moved):
        raise ValueError(f"{move!r} from window {window} leaves the {MAP_SIZE}x{MAP_SIZE} map")
    return moved


def legal_moves(window: Window) -> list[str]:
    """Moves that keep the window on the map, in MOVES order."""
    _check_window(window)
    return [m for m in MOVES if _fits(_shifted(window, m))]
