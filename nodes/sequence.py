"""Nodes that draw several images in a row: Multi-Frame (motion) and Navigate (views of a world).

Each frame is appended to the context before the next is drawn, so frame k+1 continues frame k. Both
return the frames as one IMAGE batch plus the context after the last frame. Multi-Frame's batch_size draws
several sequences side by side (item b from seed + b), returned item after item in one IMAGE batch.
"""

from __future__ import annotations

from ..bagel_model import EDIT_SETTINGS, generate_sequences
from .comfy_bridge import Progress, previewer
from .images import to_image, to_pil
from .sockets import (
    CATEGORY,
    CONTEXT,
    batch_size_input,
    context_input,
    flow_settings,
    image_input,
    library_seed,
    model_input,
    sampler_inputs,
    seed_input,
    step_cache_input,
    widget,
    with_ui,
)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def frame_prompts(prompt: str, frames: int) -> list[str]:
    """One prompt per frame: line k for frame k, the last line repeated to fill `frames`."""
    given = lines(prompt)
    if not given:
        raise ValueError("the prompt is empty: write what happens in each frame (one line per frame)")
    if len(given) > frames:
        raise ValueError(
            f"the prompt has {len(given)} lines but frames is {frames}: raise frames or drop lines"
        )
    return given + given[-1:] * (frames - len(given))


def _sequence(model, prompts, seed, image, context, sampler, batch_size=1) -> dict:
    """The one library call both nodes make: frames from the image / context, then the node outputs (every
    item's frames in one batch, item-major; the first item's context)."""
    bagel = model.ready()
    frames, contexts = generate_sequences(
        bagel,
        prompts,
        context=context,
        image=None if image is None else to_pil(image),
        settings=flow_settings(**sampler),
        seed=library_seed(seed),
        batch_size=batch_size,
        callback=Progress(runs=len(prompts), preview=previewer(bagel)),
    )
    return with_ui((to_image([f for item in frames for f in item]), contexts[0]), contexts[0])


class BAGELMultiFrame:
    DESCRIPTION = (
        "Draws N frames that continue each other (motion, a story), starting from an image or the "
        "context's latest image; without either, the first frame is drawn from the prompt."
    )
    CATEGORY = f"{CATEGORY}/sequence"
    RETURN_TYPES = ("IMAGE", CONTEXT)
    RETURN_NAMES = ("frames", "context")
    OUTPUT_TOOLTIPS = (
        "The frames as one batch, in order; with batch_size > 1 every sequence's frames, the first "
        "sequence's then the second's (frames x batch_size images).",
        "The context after the last frame (of the first sequence).",
    )
    FUNCTION = "frames"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "prompt": widget(
                    "STRING", "What happens from frame to frame: one line repeated for every frame, or one "
                    "line per frame (the last line repeats).",
                    multiline=True, default="the red circle moves right",
                ),
                "frames": widget("INT", "How many frames to draw.", default=4, min=1, max=64),
                "seed": seed_input(),
                **sampler_inputs(EDIT_SETTINGS),
            },
            "optional": {
                "image": image_input("The starting frame; optional with a context that holds an image."),
                "context": context_input(),
                "step_cache": step_cache_input(),
                "batch_size": batch_size_input("sequences"),
            },
        }  # fmt: skip

    def frames(self, model, prompt, frames, seed, image=None, context=None, batch_size=1, **sampler):
        return _sequence(model, frame_prompts(prompt, frames), seed, image, context, sampler, batch_size)


class BAGELNavigate:
    DESCRIPTION = (
        "Moves through a world one action at a time (e.g. 'move left'): one new view per action, each "
        "continuing the last, starting from an image or the context's latest image."
    )
    CATEGORY = f"{CATEGORY}/sequence"
    RETURN_TYPES = ("IMAGE", CONTEXT)
    RETURN_NAMES = ("views", "context")
    OUTPUT_TOOLTIPS = ("One view per action, as one batch.", "The context after the last view.")
    FUNCTION = "navigate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "actions": widget(
                    "STRING", "One action per line, e.g. move left, move up.",
                    multiline=True, default="move left\nmove up",
                ),
                "seed": seed_input(),
                **sampler_inputs(EDIT_SETTINGS),
            },
            "optional": {
                "image": image_input("The starting view; optional with a context that holds an image."),
                "context": context_input(),
                "step_cache": step_cache_input(),
            },
        }  # fmt: skip

    def navigate(self, model, actions, seed, image=None, context=None, **sampler):
        if image is None and (context is None or context.image_size is None):
            raise ValueError("Navigate needs a starting view: connect an image, or a context that holds one")
        if not lines(actions):
            raise ValueError("no actions: write one per line, e.g. move left")
        return _sequence(model, lines(actions), seed, image, context, sampler)
