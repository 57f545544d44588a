"""Edit instructions paired with the scene they must produce.

An edit changes exactly one object and keeps the scene within the spec's 1 to 3 objects, so grading can
compare the changed cell(s) and the untouched ones separately (`grading.grade_edit`). Instructions use the
spec's exact wording per kind. A recolor names its object by shape ("make the circle green") when the shape
is unique; `recolor_shared` is the recolor of an object whose shape another object shares, so it names the
color too ("make the green triangle red" beside a yellow triangle), the way a move names its object. This
module knows nothing of pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .language import kind_is_unique, shape_is_unique
from .scene import COLORS, Obj, Scene, random_object

EDIT_KINDS = ("recolor", "recolor_shared", "move", "add", "remove")
MAX_OBJECTS = 3  # edits never leave the spec's 1..3 range
MIN_OBJECTS = 1


@dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    before: Scene
    after: Scene


def sample_edit(scene: Scene, kind: str, rng: random.Random) -> Edit | None:
    """A random edit of the given kind, or None when the scene allows none.

    None happens when no object can be named unambiguously (recolor/remove name "the <shape>",
    move and recolor_shared name "the <color> <shape>"), when recolor_shared finds no two objects of one
    shape, when there is no free cell, or when the scene would leave 1..3 objects.
    """
    if kind in ("recolor", "recolor_shared"):
        shared = kind == "recolor_shared"
        targets = [
            o for o in scene.objects if kind_is_unique(scene, o) and shape_is_unique(scene, o) is not shared
        ]
        if not targets:
            return None
        old = rng.choice(targets)
        color = rng.choice([c for c in COLORS if c != old.color])
        name = f"{old.color} {old.shape}" if shared else old.shape
        new = Obj(color, old.shape, old.cell)
        return Edit(kind, f"make the {name} {color}", scene, scene.replace(old, new))
    if kind == "move":
        targets = [o for o in scene.objects if kind_is_unique(scene, o)]
        free = scene.empty_cells()
        if not targets or not free:
            return None
        old, cell = rng.choice(targets), rng.choice(free)
        new = Obj(old.color, old.shape, cell)
        return Edit(kind, f"move the {old.color} {old.shape} to the {cell}", scene, scene.replace(old, new))
    if kind == "add":
        free = scene.empty_cells()
        if len(scene.objects) >= MAX_OBJECTS or not free:
            return None
        new = random_object(rng, rng.choice(free))
        instruction = f"add a {new.color} {new.shape} at the {new.cell}"
        return Edit(kind, instruction, scene, Scene(scene.objects + (new,)))
    if kind == "remove":
        targets = [o for o in scene.objects if shape_is_unique(scene, o)]
        if len(scene.objects) <= MIN_OBJECTS or not targets:
            return None
        old = rng.choice(targets)
        return Edit(kind, f"remove the {old.shape}", scene, scene.replace(old, None))
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")
