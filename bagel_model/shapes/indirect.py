"""Prompts that name a color or shape indirectly, with the thought that resolves them.

These exercise "thinking": the prompt never says the color or shape, the thought states the two facts it
needs and then the canonical description, which `language.parse_description` reads back. Only the spec's
hints exist; new ones would need the spec to change so every grader agrees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .language import THINK_END, describe
from .scene import CELLS, COLORS, SHAPES, Obj, Scene

# color -> (hint used in the prompt, fact stated in the thought)
COLOR_HINTS: dict[str, tuple[str, str]] = {
    "blue": ("the color of the sky", "the sky is blue"),
    "green": ("the color of grass", "grass is green"),
    "yellow": ("the color of a banana", "a banana is yellow"),
    "red": ("the color of a strawberry", "a strawberry is red"),
    "purple": ("the color of an eggplant", "an eggplant is purple"),
}
SHAPE_HINTS: dict[str, tuple[str, str]] = {
    "triangle": ("a shape with three corners", "three corners is a triangle"),
    "square": ("a shape with four equal sides", "four equal sides is a square"),
    "circle": ("a shape with no corners", "no corners is a circle"),
}


@dataclass(frozen=True)
class Indirect:
    prompt: str  # e.g. "draw a shape with three corners in the color of the sky at the center"
    thought: str  # e.g. "<think> three corners is a triangle; the sky is blue. </think> a blue triangle ..."
    scene: Scene


def indirect_prompt(obj: Obj) -> Indirect:
    """The indirect prompt for one object and the thought that resolves it."""
    shape_hint, shape_fact = SHAPE_HINTS[obj.shape]
    color_hint, color_fact = COLOR_HINTS[obj.color]
    scene = Scene((obj,))
    prompt = f"draw {shape_hint} in {color_hint} at the {obj.cell}"
    thought = f"<think> {shape_fact}; {color_fact}. {THINK_END} {describe(scene)}"
    return Indirect(prompt, thought, scene)


def sample_indirect(rng: random.Random) -> Indirect:
    return indirect_prompt(Obj(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(CELLS)))
