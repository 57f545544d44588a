"""The shapes world: vocabulary, rendering, language, edits, motion, navigation, and the scorer.

The scorer tests measure on real renders: exact at every size, and tolerant of the blur, noise and color
drift a small generator produces (the thresholds below are the measured rates rounded down).
"""

from __future__ import annotations

import ast
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bagel_model.shapes import (
    CELLS,
    COLOR_HINTS,
    COLORS,
    DIRECTIONS,
    EDIT_KINDS,
    SHAPE_HINTS,
    SHAPES,
    MapObj,
    Obj,
    Scene,
    WorldMap,
    cell_position,
    describe,
    edit_correct,
    grade_edit,
    indirect_prompt,
    legal_moves,
    motion_frames,
    move_window,
    navigation_consistent,
    paraphrase,
    parse_description,
    questions,
    read_scene,
    render,
    sample_edit,
    sample_indirect,
    sample_motion,
    sample_scene,
    sample_world,
    scene_matches,
    view,
)

SHAPES_DIR = Path(__file__).resolve().parents[1] / "bagel_model" / "shapes"
SPEC_SCENE = Scene((Obj("blue", "square", "center"), Obj("red", "circle", "top left")))


def scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def degrade(
    scene: Scene, rng: np.random.Generator, blur: float, noise: float, drift: float, tint: float
) -> np.ndarray:
    """A render as a small generator might paint it: drifted colors, off-white paper, blur, pixel noise."""
    pixels = np.asarray(render(scene, 64), dtype=np.float64).copy()
    for rgb in COLORS.values():
        pixels[(pixels == rgb).all(-1)] = np.clip(np.array(rgb) + rng.uniform(-drift, drift, 3), 0, 255)
    pixels[(pixels == 255).all(-1)] = 255 - tint
    blurred = Image.fromarray(pixels.round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(blurred, dtype=np.float64) + rng.normal(0, noise, pixels.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


# --- vocabulary and scenes ---------------------------------------------------------------------------


def test_vocabulary_is_the_spec():
    assert COLORS == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (235, 200, 40),
        "purple": (150, 60, 190),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert CELLS[0] == "top left" and CELLS[4] == "center" and CELLS[8] == "bottom right"
    assert set(COLOR_HINTS) == set(COLORS) and set(SHAPE_HINTS) == set(SHAPES)


@pytest.mark.parametrize(
    ("args", "bad"),
    [
        (("orange", "circle", "top"), "orange"),
        (("red", "hexagon", "top"), "hexagon"),
        (("red", "circle", "middle"), "middle"),
    ],
)
def test_obj_rejects_unknown_names_by_name(args, bad):
    with pytest.raises(ValueError, match=bad):
        Obj(*args)


def test_scene_is_order_free_and_one_object_per_cell():
    a, b = Obj("red", "circle", "bottom"), Obj("blue", "square", "top")
    assert Scene((a, b)) == Scene((b, a))
    assert Scene((a, b)).objects == (b, a)  # reading order
    with pytest.raises(ValueError, match="top"):
        Scene((b, Obj("green", "triangle", "top")))


def test_sampler_is_reproducible_by_seed_and_keeps_one_to_three_objects():
    assert scenes(7, 50) == scenes(7, 50)
    assert scenes(7, 50) != scenes(8, 50)
    drawn = scenes(0, 500)
    assert {len(s.objects) for s in drawn} == {1, 2, 3}
    assert len({obj.color for s in drawn for obj in s.objects}) == 5


# --- rendering --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 48, 64, 96, 128, 256])
def test_render_geometry(size):
    scene = Scene((Obj("purple", "square", "top"), Obj("yellow", "triangle", "bottom right")))
    image = render(scene, size)
    assert image.mode == "RGB" and image.size == (size, size)
    pixels = np.asarray(image)
    assert {tuple(p) for p in pixels.reshape(-1, 3)} == {(255, 255, 255), COLORS["purple"], COLORS["yellow"]}
    cell = size / 3
    rows, cols = np.nonzero((pixels == COLORS["purple"]).all(-1))
    centre = rows.mean() + 0.5, cols.mean() + 0.5  # pixel i covers [i, i + 1)
    assert abs(centre[0] - cell / 2) <= 0.5 and abs(centre[1] - 1.5 * cell) <= 0.5  # centred in its cell
    assert abs(rows.max() - rows.min() + 1 - 2 / 3 * cell) <= 0.5  # side = 2/3 of the cell, rounded
    triangle = (pixels == COLORS["yellow"]).all(-1)
    widths = triangle.sum(axis=1)[triangle.any(axis=1)]
    assert list(widths) == sorted(widths) and widths[0] < widths[-1]  # upright: apex up, base down


def test_render_rejects_sizes_off_the_16_grid():
    with pytest.raises(ValueError, match="100"):
        render(SPEC_SCENE, 100)


# --- scorer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 96, 128])
def test_scorer_is_exact_on_renders(size):
    for scene in scenes(size, 300):
        assert read_scene(render(scene, size)) == scene


def test_scorer_reads_arrays_and_empty_images():
    assert read_scene(np.asarray(render(SPEC_SCENE, 64))) == SPEC_SCENE
    assert read_scene(np.full((64, 64, 3), 255, np.uint8)) == Scene()
    noise = np.random.default_rng(0).normal(0, 8, (64, 64, 3))
    assert read_scene(np.clip(255 + noise, 0, 255)) == Scene()
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        read_scene(np.zeros((64, 64)))


@pytest.mark.parametrize(
    ("blur", "noise", "drift", "tint", "at_least"),
    [
        (1.0, 8, 0, 0, 0.99),  # measured 300/300
        (1.0, 8, 30, 15, 0.99),  # colors off by up to 30 per channel, paper at 240: measured 300/300
        (1.5, 8, 0, 0, 0.97),  # heavier blur: measured 300/300 here, 399/400 on another draw
        (1.0, 16, 30, 15, 0.97),  # all of it with twice the noise: measured 297/300
    ],
)
def test_scorer_tolerates_generator_blur_noise_and_drift(blur, noise, drift, tint, at_least):
    rng = np.random.default_rng(0)
    tests = scenes(1, 300)
    right = sum(read_scene(degrade(s, rng, blur, noise, drift, tint)) == s for s in tests)
    assert right / len(tests) >= at_least


# --- language ----------------------------------------------------------------------------------------


def test_describe_is_canonical():
    assert describe(SPEC_SCENE) == "a red circle at the top left, a blue square at the center"
    assert describe(Scene((Obj("green", "triangle", "top"),))) == "a green triangle at the top"


def test_description_round_trips_and_parser_refuses_what_it_cannot_read():
    for scene in scenes(2, 300) + [Scene()]:
        assert parse_description(describe(scene)) == scene
    assert parse_description("  A red circle at the top left, a blue square at the center. ") == SPEC_SCENE
    assert parse_description("a red circle in the top left") is None
    assert parse_description("a red circle at the top, a blue square at the top") is None
    assert parse_description("a pink circle at the top") is None


def test_paraphrases_are_deterministic_and_name_every_object():
    for scene in scenes(3, 50):
        text = paraphrase(scene, random.Random(5))
        assert text == paraphrase(scene, random.Random(5))
        for obj in scene.objects:
            assert f"{obj.color} {obj.shape}" in text and obj.cell in text


def test_questions_use_the_spec_forms():
    qa = {q.question: q.answer for q in questions(SPEC_SCENE)}
    assert qa == {
        "how many shapes are there?": "2",
        "what color is the circle?": "red",
        "what color is the square?": "blue",
        "what shape is at the top left?": "circle",
        "what shape is at the center?": "square",
        "where is the red circle?": "top left",
        "where is the blue square?": "center",
        "describe the image.": "a red circle at the top left, a blue square at the center",
    }
    twins = Scene((Obj("red", "circle", "top"), Obj("blue", "circle", "bottom")))
    assert not [q for q in questions(twins) if q.kind == "color"]  # "the circle" would be ambiguous


def test_indirect_prompt_and_thought_follow_the_spec_example():
    task = indirect_prompt(Obj("blue", "triangle", "center"))
    assert task.prompt == "draw a shape with three corners in the color of the sky at the center"
    assert (
        task.thought
        == "<think> three corners is a triangle; the sky is blue. </think> a blue triangle at the center"
    )
    rng = random.Random(4)
    for _ in range(50):
        task = sample_indirect(rng)
        assert parse_description(task.thought) == task.scene
        assert not any(word in task.prompt.split() for word in [*COLORS, *SHAPES])


# --- edits and grading -------------------------------------------------------------------------------

INSTRUCTION = {
    "recolor": r"make the (\w+) (\w+)",
    "recolor_shared": r"make the (\w+) (\w+) (\w+)",
    "move": r"move the (\w+) (\w+) to the ([a-z ]+)",
    "add": r"add a (\w+) (\w+) at the ([a-z ]+)",
    "remove": r"remove the (\w+)",
}


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_every_edit_changes_exactly_one_object(kind):
    rng, made = random.Random(kind), 0
    for scene in scenes(4, 200):
        edit = sample_edit(scene, kind, rng)
        if edit is None:
            continue
        made += 1
        assert re.fullmatch(INSTRUCTION[kind], edit.instruction)
        gone = set(edit.before.objects) - set(edit.after.objects)
        new = set(edit.after.objects) - set(edit.before.objects)
        changes = {"recolor": (1, 1), "recolor_shared": (1, 1), "move": (1, 1), "add": (0, 1)}
        assert (len(gone), len(new)) == changes.get(kind, (1, 0))
        assert 1 <= len(edit.after.objects) <= 3
        if kind.startswith("recolor"):
            (old,), (obj,) = gone, new
            assert (old.shape, old.cell) == (obj.shape, obj.cell) and edit.instruction.endswith(obj.color)
            twins = [o for o in edit.before.objects if o.shape == old.shape and o != old]
            assert bool(twins) is (kind == "recolor_shared")  # named by color exactly when shared
            if twins:  # the instruction names the one object of its color and shape
                assert edit.instruction.startswith(f"make the {old.color} {old.shape} ")
                assert all(t.color != old.color for t in twins)
        if kind == "move":
            (old,), (obj,) = gone, new
            assert (old.color, old.shape) == (obj.color, obj.shape) and edit.instruction.endswith(obj.cell)
        assert edit_correct(edit.before, read_scene(render(edit.after)), edit.after)
    assert made > 50
    with pytest.raises(ValueError, match="rotate"):
        sample_edit(SPEC_SCENE, "rotate", rng)


def test_edit_grading_separates_the_change_from_the_rest():
    before = SPEC_SCENE
    asked = Scene(
        (Obj("green", "circle", "top left"), Obj("blue", "square", "center"))
    )  # make the circle green
    assert grade_edit(before, asked, asked).correct and scene_matches(asked, asked)
    unchanged = grade_edit(before, before, asked)
    assert not unchanged.changed_right and unchanged.others_kept
    collateral = Scene((Obj("green", "circle", "top left"), Obj("blue", "square", "bottom")))
    grade = grade_edit(before, collateral, asked)
    assert grade.changed_right and not grade.others_kept and not edit_correct(before, collateral, asked)
    extra = Scene(asked.objects + (Obj("red", "square", "top"),))
    assert not edit_correct(before, extra, asked) and not scene_matches(extra, asked)


# --- motion -------------------------------------------------------------------------------------------


def test_motion_advances_one_cell_per_frame_and_stops_at_the_edge():
    still = Obj("blue", "square", "bottom")
    scene = Scene((Obj("red", "circle", "top left"), still))
    frames = motion_frames(scene, Obj("red", "circle", "top left"), "right")
    assert [f.objects[0].cell for f in frames] == ["top left", "top", "top right"]
    assert all(f.at("bottom") == still for f in frames)
    assert motion_frames(frames[-1], Obj("red", "circle", "top right"), "right") == (frames[-1],)
    blocked = Scene((Obj("red", "circle", "top"), still))
    with pytest.raises(ValueError, match="blocked at the bottom"):
        motion_frames(blocked, Obj("red", "circle", "top"), "down")


def test_sampled_motions_end_at_the_edge_and_move_nothing_else():
    rng, made = random.Random(6), 0
    for scene in scenes(6, 100):
        motion = sample_motion(scene, rng)
        if motion is None:
            continue
        made += 1
        _, color, shape, _, direction = motion.instruction.split()
        assert motion.frames[0] == scene and len(motion.frames) >= 2
        for earlier, later in zip(motion.frames, motion.frames[1:], strict=False):
            gone, new = set(earlier.objects) - set(later.objects), set(later.objects) - set(earlier.objects)
            assert len(gone) == len(new) == 1 and {(o.color, o.shape) for o in gone | new} == {(color, shape)}
            (a,), (b,) = gone, new
            (ra, ca), (rb, cb) = cell_position(a.cell), cell_position(b.cell)
            assert (rb - ra, cb - ca) == DIRECTIONS[direction]
        (row, col), (dr, dc) = cell_position(b.cell), DIRECTIONS[direction]
        assert not (0 <= row + dr < 3 and 0 <= col + dc < 3)  # stopped at the edge
    assert made > 50


# --- navigation ---------------------------------------------------------------------------------------


def test_view_content_slides_against_the_move():
    world = WorldMap((MapObj("red", "circle", 1, 2), MapObj("blue", "square", 0, 4)))
    assert view(world, (0, 0)) == Scene((Obj("red", "circle", "right"),))
    assert move_window((0, 0), "move right") == (0, 1)
    assert view(world, (0, 1)) == Scene((Obj("red", "circle", "center"),))  # slid left
    assert view(world, (0, 2)) == Scene((Obj("blue", "square", "top right"), Obj("red", "circle", "left")))
    assert legal_moves((0, 0)) == ["move right", "move down"]
    with pytest.raises(ValueError, match="leaves"):
        move_window((0, 0), "move up")
    with pytest.raises(ValueError, match="move north"):
        move_window((1, 1), "move north")


def test_navigation_consistency_accepts_true_views_and_rejects_wrong_ones():
    rng = random.Random(8)
    for _ in range(20):
        world = sample_world(rng)
        for window in [(r, c) for r in range(3) for c in range(3)]:
            for move in legal_moves(window):
                before, after = view(world, window), view(world, move_window(window, move))
                assert navigation_consistent(before, after, move)
    world = WorldMap((MapObj("red", "circle", 2, 2), MapObj("green", "triangle", 2, 3)))
    before, after = view(world, (1, 1)), view(world, (1, 2))  # "move right"
    assert navigation_consistent(before, after, "move right")
    assert not navigation_consistent(before, after, "move left")  # content slid the wrong way
    assert not navigation_consistent(before, before, "move right")  # the view did not move
    recolored = Scene((Obj("blue", "circle", "left"), Obj("green", "triangle", "center")))
    assert after == Scene((Obj("red", "circle", "left"), Obj("green", "triangle", "center")))
    assert not navigation_consistent(before, recolored, "move right")
    revealed = Scene(after.objects + (Obj("yellow", "square", "top right"),))  # newly revealed cells are free
    assert navigation_consistent(before, revealed, "move right")


def test_package_imports_only_numpy_pil_and_the_standard_library():
    """The world must be usable (data making, grading) where torch and ComfyUI are absent."""
    allowed = {"numpy", "PIL", "__future__", *sys.stdlib_module_names}
    for path in SHAPES_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
