"""The shapes world's vocabulary and its scene value: what exists, not how it looks or is said.

Everything else in the package (rendering, language, edits, motion, navigation, scoring) agrees on these
names because they are written once here. This module knows nothing of pixels or sentences.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

# Exact RGB values; the scorer classifies a region by the nearest of these, so they are kept far apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Row-major: the index of a name is row * 3 + column, and this order is the canonical reading order.
CELLS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
GRID = 3
# One step in each direction as (row, column) deltas; motion moves objects by it, navigation the window.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def check_name(kind: str, value: object, allowed: Iterable[str]) -> None:
    """A ValueError naming the bad value and the allowed ones, so a typo in a prompt file is obvious."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


def check_direction(direction: str) -> tuple[int, int]:
    """The (row, column) step of a direction name, or a ValueError naming it."""
    check_name("direction", direction, DIRECTIONS)
    return DIRECTIONS[direction]


def cell_position(cell: str) -> tuple[int, int]:
    """(row, column) of a cell name, rows counted from the top."""
    check_name("cell", cell, CELLS)
    return divmod(CELLS.index(cell), GRID)


def cell_name(row: int, col: int) -> str:
    """The cell name at (row, column); a ValueError outside the 3×3 grid."""
    if not (0 <= row < GRID and 0 <= col < GRID):
        raise ValueError(f"cell position ({row}, {col}) is outside the {GRID}x{GRID} grid")
    return CELLS[row * GRID + col]


@dataclass(frozen=True)
class Obj:
    """One filled shape in one cell."""

    color: str
    shape: str
    cell: str

    def __post_init__(self) -> None:
        check_name("color", self.color, COLORS)
        check_name("shape", self.shape, SHAPES)
        check_name("cell", self.cell, CELLS)


@dataclass(frozen=True)
class Scene:
    """A set of objects, at most one per cell, kept in reading order.

    Sorting on construction makes equality order-free, so a scene read back from pixels compares equal
    to the asked one whatever order either was built in. Any count from 0 to 9 is a valid scene (a
    navigation view may be empty); the 1-to-3 rule of the spec belongs to the samplers and edits.
    """

    objects: tuple[Obj, ...] = ()

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        for obj in objects:
            if not isinstance(obj, Obj):
                raise ValueError(f"a scene holds Obj values, got {obj!r}")
        cells = [obj.cell for obj in objects]
        doubled = sorted({c for c in cells if cells.count(c) > 1}, key=CELLS.index)
        if doubled:
            raise ValueError(f"more than one object in cell(s) {', '.join(doubled)}")
        object.__setattr__(self, "objects", tuple(sorted(objects, key=lambda o: CELLS.index(o.cell))))

    def at(self, cell: str) -> Obj | None:
        """The object in a cell, or None when the cell is empty."""
        check_name("cell", cell, CELLS)
        return next((obj for obj in self.objects if obj.cell == cell), None)

    def empty_cells(self) -> list[str]:
        """Free cells in reading order."""
        taken = {obj.cell for obj in self.objects}
        return [cell for cell in CELLS if cell not in taken]

    def replace(self, old: Obj, new: Obj | None) -> Scene:
        """This scene with `old` swapped for `new` (or removed when `new` is None)."""
        if old not in self.objects:
            raise ValueError(f"{old} is not in the scene")
        kept = [obj for obj in self.objects if obj != old]
        return Scene(tuple(kept) + ((new,) if new is not None else ()))


def random_object(rng: random.Random, cell: str) -> Obj:
    """A uniformly random color and shape in the given cell."""
    return Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), cell)


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """A random scene; the same rng state always gives the same scene (datasets are reproducible by seed)."""
    if not 0 <= min_objects <= max_objects <= len(CELLS):
        raise ValueError(f"need 0 <= min_objects <= max_objects <= 9, got {min_objects} and {max_objects}")
    count = rng.randint(min_objects, max_objects)
    return Scene(tuple(random_object(rng, cell) for cell in rng.sample(CELLS, count)))
