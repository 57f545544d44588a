"""The bundled default model: a tiny BAGEL trained on the shapes world (`bagel_model/bundled/`).

It is what every workflow and command runs out of the box, so these tests hold it to the promise of its
model card: it loads strictly in the official layout, runs a task in seconds on a CPU, and does what is
asked on fixed prompts and seeds, graded by the shapes scorer (not by looking at tensors).
"""

from __future__ import annotations

import time

import pytest

import bagel_model
from bagel_model import tasks
from bagel_model.bundled import BUNDLED_DIR, default_model_dir
from bagel_model.layout import read_config
from bagel_model.shapes import (
    Obj,
    Scene,
    edit_correct,
    parse_description,
    read_scene,
    render,
    scene_matches,
)
from bagel_model.training.recipe import bundled_config


@pytest.fixture(scope="module")
def bundled() -> bagel_model.BagelModel:
    return bagel_model.load(default_model_dir())


def test_the_bundled_folder_is_the_default_small_and_documented():
    assert default_model_dir() == BUNDLED_DIR
    size = sum(f.stat().st_size for f in BUNDLED_DIR.iterdir())
    assert size <= 30 * 2**20, size
    want = bundled_config()
    got = read_config(BUNDLED_DIR)
    assert (got.llm.hidden_size, got.llm.num_hidden_layers) == (
        want.llm.hidden_size,
        want.llm.num_hidden_layers,
    )
    assert (got.vit.patch_size, got.inference.default_height) == (want.vit.patch_size, 48)
    card = (BUNDLED_DIR / "README.md").read_text()
    for row in ("understanding", "text-to-image, 1 object", "navigation"):
        assert row in card


def test_loading_and_drawing_one_scene_takes_seconds():
    start = time.perf_counter()
    model = bagel_model.load(default_model_dir())
    image = tasks.generate_images(model, "a green square at the bottom right", seed=0).images[0]  # 50 steps
    seconds = time.perf_counter() - start
    assert image.size == (48, 48)
    assert seconds < 30, f"{seconds:.1f} s"  # about 1 s on one core; the bound only catches a regression


@pytest.mark.parametrize(
    "prompt",
    ["a green square at the bottom right", "a red circle at the top left, a blue square at the center"],
)
def test_draws_the_scene_it_is_asked_for(bundled, prompt):
    image = tasks.generate_images(bundled, prompt, seed=0).images[0]
    assert scene_matches(read_scene(image), parse_description(prompt))


def test_answers_questions_about_an_image(bundled):
    scene = Scene((Obj("yellow", "triangle", "top right"), Obj("purple", "circle", "bottom left")))
    answer, _ = tasks.understand(bundled, "how many shapes are there?", image=render(scene))
    assert answer == "2"


def test_thinks_before_drawing_an_indirect_prompt(bundled):
    thought, plan = tasks.think(
        bundled, "draw a shape with three corners in the color of the sky at the center"
    )
    assert thought.endswith("</think> a blue triangle at the center")
    image = tasks.generate_images(bundled, None, context=plan, seed=0).images[0]
    assert scene_matches(read_scene(image), parse_description("a blue triangle at the center"))


def test_edits_one_object_and_leaves_the_others(bundled):
    """A pinned case (edits are right 0.98 to 1.0 of the time by kind, see its card): a regression check of
    one known-good edit, not a claim about the rate."""
    before = Scene((Obj("red", "circle", "top left"), Obj("blue", "square", "center")))
    after = Scene((Obj("red", "circle", "top left"),))
    edited = tasks.edit_images(bundled, [render(before)], "remove the square", seed=0).images[0]
    assert edit_correct(before, read_scene(edited), after)


def test_recolors_the_named_one_of_two_objects_of_a_shape(bundled):
    """The issue's case: with two triangles the instruction names the color too, and only that triangle
    changes (run 4 of the card changed the other one, both or neither in most such cases)."""
    before = Scene((Obj("green", "triangle", "top left"), Obj("yellow", "triangle", "bottom right")))
    after = Scene((Obj("red", "triangle", "top left"), Obj("yellow", "triangle", "bottom right")))
    for seed in range(3):
        result = tasks.edit_images(bundled, [render(before)], "make the green triangle red", seed=seed)
        assert edit_correct(before, read_scene(result.images[0]), after), seed
