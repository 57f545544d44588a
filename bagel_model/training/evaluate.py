"""Held-out capability check of a trained shapes-world model, through the real inference tasks and scorer.

Each capability runs the public task function with its official defaults (T2I / edit flow settings, greedy
decoding) on scenes drawn from a seed the training stream never uses, and grades the result exactly
(`shapes.read_scene`, `scene_matches`, `edit_correct`, `navigation_consistent`):

- understand: exact answer to one canonical question per image (every question kind equally often);
- t2i_1, t2i_23: the read image equals the canonical caption's scene (1 object; 2 or 3 objects);
- edit_<kind>: the changed object is right and every other cell unchanged, per edit kind (recolor,
  recolor_shared: the recolor of one of two objects of a shape, named by color and shape; move, add,
  remove);
- think: plan with `think(mode="generate")`, then draw the plan; the image must show the resolved scene;
- indirect: the indirect prompt drawn directly, without a plan (reported: the baseline for think);
- motion: the next two frames (fewer at the edge) equal the expected ones (per-frame accuracy);
- navigate: three moves; each new view keeps the cells that stay in view of the previous one.

Input pictures are rendered at the model's default size (48 px for the bundled model), as the example
workflows hand it its own images. Not here: training, or any decision about what passes (the recipe
reports the numbers).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace

from ..model import BagelModel
from ..sampling import EDIT_SETTINGS, T2I_SETTINGS
from ..shapes import (
    EDIT_KINDS,
    QUESTION_KINDS,
    describe,
    edit_correct,
    legal_moves,
    move_window,
    navigation_consistent,
    parse_description,
    questions,
    read_scene,
    render,
    sample_edit,
    sample_indirect,
    sample_motion,
    sample_scene,
    sample_world,
    view,
)
from ..tasks import TextSettings, edit_images, generate_images, generate_sequences, think, understand

EDITS = {f"edit_{kind}": kind for kind in EDIT_KINDS}  # one capability per edit kind
CAPABILITIES = ("understand", "t2i_1", "t2i_23", *EDITS, "indirect", "think", "motion", "navigate")
_EDIT_METRIC = "changed object right and the others untouched"
_EDIT_LABELS = {"recolor_shared": "recolor, shape shared"}
# The capability table (issue #13): what each row measures and its target (None: reported only).
TABLE = {
    "understand": ("understanding", "exact-answer accuracy over the five question kinds", 0.95),
    "t2i_1": ("text-to-image, 1 object", "scene exactly right (scorer)", 0.95),
    "t2i_23": ("text-to-image, 2-3 objects", "scene exactly right", 0.90),
    **{name: (f"editing: {_EDIT_LABELS.get(k, k)}", _EDIT_METRIC, 0.85) for name, k in EDITS.items()},
    "indirect": ("indirect prompts without thinking", "scene exactly right", None),
    "think": ("indirect prompts with thinking", "scene exactly right", 0.90),
    "motion": ("motion: next 2 frames", "frames exactly right", 0.80),
    "navigate": ("navigation: 3 moves", "kept cells consistent after each move", 0.80),
}
ANSWER_SETTINGS = TextSettings(max_new_tokens=64)
THOUGHT_SETTINGS = TextSettings(max_new_tokens=96)


def evaluate(
    model: BagelModel,
    n: int = 24,
    seed: int = 10_000,
    log: Callable[[str], None] = print,
    capabilities: tuple[str, ...] = CAPABILITIES,
    num_steps: int | None = None,
) -> dict[str, float]:
    """Accuracy per capability over `n` held-out cases each. `num_steps` overrides the sampler's 50 steps
    (for quick checks only)."""
    t2i = T2I_SETTINGS if num_steps is None else replace(T2I_SETTINGS, num_steps=num_steps)
    edit = EDIT_SETTINGS if num_steps is None else replace(EDIT_SETTINGS, num_steps=num_steps)
    report = {}
    for name in capabilities:
        rng = random.Random(f"{seed}-{name}")
        start = time.monotonic()
        right, total = 0, 0
        for i in range(n):
            r, t = _CASES[name](model, rng, i, t2i, edit)
            right += r
            total += t
        report[name] = right / total
        log(f"eval {name}: {report[name]:.3f} ({right}/{total}) in {time.monotonic() - start:.0f}s")
    return report


def _picture(model: BagelModel, scene):
    return render(scene, model.config.inference.default_height)


def _understand(model, rng, i, t2i, edit):
    scene = sample_scene(rng)
    qas = questions(scene)
    kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
    options = [qa for qa in qas if qa.kind == kind] or qas
    qa = rng.choice(options)
    answer, _ = understand(model, qa.question, image=_picture(model, scene), settings=ANSWER_SETTINGS)
    return int(answer.strip() == qa.answer), 1


def _t2i(counts):
    def case(model, rng, i, t2i, edit):
        count = rng.choice(counts)
        scene = sample_scene(rng, count, count)
        image = generate_images(model, describe(scene), settings=t2i, seed=i).images[0]
        return int(read_scene(image) == scene), 1

    return case


def _edit(kind: str):
    def case(model, rng, i, t2i, edit):
        while (e := sample_edit(sample_scene(rng), kind, rng)) is None:
            pass
        before = _picture(model, e.before)
        image = edit_images(model, [before], e.instruction, settings=edit, seed=i).images[0]
        return int(edit_correct(e.before, read_scene(image), e.after)), 1

    return case


def _think(model, rng, i, t2i, edit):
    ind = sample_indirect(rng)
    thought, ctx = think(model, ind.prompt, mode="generate", settings=THOUGHT_SETTINGS, seed=i)
    if parse_description(thought) is None:  # no plan to draw: the case fails without drawing
        return 0, 1
    image = generate_images(model, None, context=ctx, settings=t2i, seed=i).images[0]
    return int(read_scene(image) == ind.scene), 1


def _indirect(model, rng, i, t2i, edit):
    ind = sample_indirect(rng)
    image = generate_images(model, ind.prompt, settings=t2i, seed=i).images[0]
    return int(read_scene(image) == ind.scene), 1


def _motion(model, rng, i, t2i, edit):
    while (m := sample_motion(sample_scene(rng), rng)) is None:
        pass
    steps = min(2, len(m.frames) - 1)
    (frames,), _ = generate_sequences(
        model, [m.instruction] * steps, image=_picture(model, m.frames[0]), settings=edit, seed=i
    )
    return sum(read_scene(f) == want for f, want in zip(frames, m.frames[1 : steps + 1], strict=True)), steps


def _navigate(model, rng, i, t2i, edit):
    world = sample_world(rng)
    window = (rng.randint(0, 2), rng.randint(0, 2))
    start, moves = view(world, window), []
    for _ in range(3):
        moves.append(rng.choice(legal_moves(window)))
        window = move_window(window, moves[-1])
    (frames,), _ = generate_sequences(model, moves, image=_picture(model, start), settings=edit, seed=i)
    before, right = start, 0
    for frame, move in zip(frames, moves, strict=True):
        after = read_scene(frame)
        right += navigation_consistent(before, after, move)
        before = after
    return right, len(moves)


_CASES = {
    "understand": _understand,
    "t2i_1": _t2i((1,)),
    "t2i_23": _t2i((2, 3)),
    **{name: _edit(kind) for name, kind in EDITS.items()},
    "indirect": _indirect,
    "think": _think,
    "motion": _motion,
    "navigate": _navigate,
}
