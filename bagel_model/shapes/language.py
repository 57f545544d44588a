"""Scenes to words and back: canonical descriptions, training paraphrases, and questions with answers.

Canonical forms are what evaluation asks and grades, so they are fixed strings built from the spec's
templates; paraphrases exist only to make training text less uniform and are never parsed. Objects are
referred to the way the spec's examples do ("the circle" by shape, "the red circle" by color and shape),
and only when that reference picks out exactly one object. This module knows nothing of pixels.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .scene import CELLS, COLORS, SHAPES, Obj, Scene

# The spec gives no wording for a scene without objects (only navigation views can be empty); this one
# keeps `describe` total and parses back.
EMPTY_DESCRIPTION = "nothing"
THINK_END = "</think>"

_PHRASES = (
    "a {color} {shape} at the {cell}",
    "a {color} {shape} in the {cell}",
    "there is a {color} {shape} at the {cell}",
    "the {cell} has a {color} {shape}",
)
_JOINERS = (", ", " and ", "; ")
_OBJECT = re.compile(rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(CELLS)})")


def shape_is_unique(scene: Scene, obj: Obj) -> bool:
    """True when "the <shape>" names this object alone."""
    return sum(o.shape == obj.shape for o in scene.objects) == 1


def kind_is_unique(scene: Scene, obj: Obj) -> bool:
    """True when "the <color> <shape>" names this object alone."""
    return sum((o.color, o.shape) == (obj.color, obj.shape) for o in scene.objects) == 1


def describe(scene: Scene) -> str:
    """The canonical description: objects in reading order joined by ", "."""
    if not scene.objects:
        return EMPTY_DESCRIPTION
    return ", ".join(f"a {o.color} {o.shape} at the {o.cell}" for o in scene.objects)


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A training-only rewording (phrase template, joiner and object order drawn from rng)."""
    if not scene.objects:
        return EMPTY_DESCRIPTION
    phrase, joiner = rng.choice(_PHRASES), rng.choice(_JOINERS)
    objects = list(scene.objects)
    rng.shuffle(objects)
    return joiner.join(phrase.format(color=o.color, shape=o.shape, cell=o.cell) for o in objects)


def parse_description(text: str) -> Scene | None:
    """The scene a canonical description names, or None when the text is not one.

    Text up to a closing `</think>` is skipped, so a thinking answer parses to the scene it settles on.
    Case, surrounding whitespace and a final period are forgiven; anything else (a paraphrase, an unknown
    word, two objects in one cell) gives None, because a grader must not guess.
    """
    text = text.rsplit(THINK_END, 1)[-1].strip().lower().removesuffix(".").strip()
    if text == EMPTY_DESCRIPTION:
        return Scene()
    objects = []
    for part in text.split(", "):
        match = _OBJECT.fullmatch(part.strip())
        if match is None:
            return None
        objects.append(Obj(*match.groups()))
    try:
        return Scene(tuple(objects))
    except ValueError:
        return None


QUESTION_KINDS = ("count", "color", "shape", "where", "describe")


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


def questions(scene: Scene) -> list[QA]:
    """Every canonical question the scene can answer unambiguously, with its answer.

    Returned in QUESTION_KINDS order so a caller picks one with its own rng; a kind is missing when the
    scene cannot support it (no unique shape to ask the color of, say).
    """
    qas = [QA("count", "how many shapes are there?", str(len(scene.objects)))]
    unique_shapes = [o for o in scene.objects if shape_is_unique(scene, o)]
    qas += [QA("color", f"what color is the {o.shape}?", o.color) for o in unique_shapes]
    qas += [QA("shape", f"what shape is at the {o.cell}?", o.shape) for o in scene.objects]
    qas += [
        QA("where", f"where is the {o.color} {o.shape}?", o.cell)
        for o in scene.objects
        if kind_is_unique(scene, o)
    ]
    qas.append(QA("describe", "describe the image.", describe(scene)))
    return qas
