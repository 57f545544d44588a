"""The shapes world: a tiny synthetic world where every BAGEL capability has one exact right answer.

A scene is 1 to 3 colored shapes on a 3×3 grid (`scene`). From it this package makes the image (`render`),
the words (`language`: descriptions, paraphrases, questions; `indirect`: prompts that need a thought),
edits (`edits`), motion sequences (`motion`) and navigation views of a 5×5 map (`navigation`), and it reads
generated images back (`scorer`) to grade them (`grading`). The vocabulary and geometry are fixed by
SHAPES_WORLD.md so that data making, training and evaluation agree.

Deliberately not here: no model, no torch, no tokenizer, no dataset files or training loop, and no
ComfyUI. Everything is plain Python, numpy and PIL, seeded through `random.Random`, so the same seed
gives the same data on any machine and the scorer can grade output from any model.
"""

from .edits import EDIT_KINDS, Edit, sample_edit
from .grading import EditGrade, edit_correct, grade_edit, navigation_consistent, scene_matches
from .indirect import COLOR_HINTS, SHAPE_HINTS, Indirect, indirect_prompt, sample_indirect
from .language import (
    EMPTY_DESCRIPTION,
    QA,
    QUESTION_KINDS,
    describe,
    kind_is_unique,
    paraphrase,
    parse_description,
    questions,
    shape_is_unique,
)
from .motion import Motion, motion_frames, sample_motion
from .navigation import (
    MAP_SIZE,
    MOVES,
    MapObj,
    Window,
    WorldMap,
    legal_moves,
    move_step,
    move_window,
    sample_world,
    view,
)
from .render import render
from .scene import (
    CELLS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    Obj,
    Scene,
    cell_name,
    cell_position,
    random_object,
    sample_scene,
)
from .scorer import read_scene

__all__ = [
    "CELLS",
    "COLORS",
    "COLOR_HINTS",
    "DIRECTIONS",
    "EDIT_KINDS",
    "EMPTY_DESCRIPTION",
    "MAP_SIZE",
    "MOVES",
    "QA",
    "QUESTION_KINDS",
    "SHAPES",
    "SHAPE_HINTS",
    "Edit",
    "EditGrade",
    "Indirect",
    "MapObj",
    "Motion",
    "Obj",
    "Scene",
    "Window",
    "WorldMap",
    "cell_name",
    "cell_position",
    "describe",
    "edit_correct",
    "grade_edit",
    "indirect_prompt",
    "kind_is_unique",
    "legal_moves",
    "move_step",
    "motion_frames",
    "move_window",
    "navigation_consistent",
    "paraphrase",
    "parse_description",
    "questions",
    "random_object",
    "read_scene",
    "render",
    "sample_edit",
    "sample_indirect",
    "sample_motion",
    "sample_scene",
    "sample_world",
    "scene_matches",
    "shape_is_unique",
    "view",
]
