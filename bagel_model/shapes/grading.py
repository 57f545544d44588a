"""Grading: compare a scene read from a generated image with the scene that was asked for.

Everything here works on `Scene` values, never on pixels (`scorer.read_scene` turns images into scenes),
so the rules are plain set logic that a test can state exactly. Only the spec's notions of "right" live
here: a generation must match in full; an edit must get its changed cells right and leave every other cell
as the target has it; a navigation step must keep the cells that stay in view.
"""

from __future__ import annotations

from dataclasses import dataclass

from .navigation import move_step
from .scene import CELLS, GRID, Scene, cell_name


def scene_matches(read: Scene, asked: Scene) -> bool:
    """A generation is right when every object, color, shape and cell matches, and nothing is extra."""
    return read == asked


@dataclass(frozen=True)
class EditGrade:
    """The two halves of an edit's grade, kept apart so reports can say which one a model fails."""

    changed_right: bool  # every cell the edit changes shows what the target has there
    others_kept: bool  # every other cell (empty ones too) still shows what it showed before

    @property
    def correct(self) -> bool:
        return self.changed_right and self.others_kept


def grade_edit(before: Scene, after_read: Scene, asked_after: Scene) -> EditGrade:
    """Grade an edited image (read back as `after_read`) against the edit from `before` to `asked_after`."""
    changed = [cell for cell in CELLS if before.at(cell) != asked_after.at(cell)]
    kept = [cell for cell in CELLS if cell not in changed]
    return EditGrade(
        changed_right=all(after_read.at(cell) == asked_after.at(cell) for cell in changed),
        others_kept=all(after_read.at(cell) == before.at(cell) for cell in kept),
    )


def edit_correct(before: Scene, after_read: Scene, asked_after: Scene) -> bool:
    """True when the changed object is right and every other object is unchanged."""
    return grade_edit(before, after_read, asked_after).correct


def _content(scene: Scene, row: int, col: int) -> tuple[str, str] | None:
    obj = scene.at(cell_name(row, col))
    return None if obj is None else (obj.color, obj.shape)


def navigation_consistent(before: Scene, after: Scene, move: str) -> bool:
    """True when every cell that stays in view after `move` shows what it showed before.

    After "move right" the view's cell (r, c) shows what cell (r, c + 1) showed before; the newly revealed
    column is free, so it is not checked.
    """
    dr, dc = move_step(move)
    return all(
        _content(after, row, col) == _content(before, row + dr, col + dc)
        for row in range(GRID)
        for col in range(GRID)
        if 0 <= row + dr < GRID and 0 <= col + dc < GRID
    )
