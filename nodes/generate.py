"""Nodes that draw one image: Text to Image and Edit.

Each returns the image and the context with that image appended, so an Edit fed by another Edit's context
continues the same session (a multi-turn edit chain, nothing re-encoded).
"""

from __future__ import annotations

from ..bagel_model import EDIT_SETTINGS, T2I_SETTINGS, edit_image, generate_image
from .comfy_bridge import Progress
from .images import to_image, to_pil
from .sockets import (
    CATEGORY,
    CONTEXT,
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


def size_input(side: str) -> tuple:
    # 0 by default: no single number suits both BAGEL-7B-MoT (1024) and the bundled 64 px model. The widget
    # cannot see the connected model, so max is the largest any model takes, and the tooltip names each
    # model's own limit; a size above it stops the run with an error naming the input and the limit.
    return widget(
        "INT",
        f"Image {side} in pixels, a multiple of 16 up to the connected model's limit: 1024 for "
        "BAGEL-7B-MoT, 256 for the bundled model (a larger value stops the run with an error naming the "
        "limit). 0: the model's default size (1024 for BAGEL-7B-MoT, 64 for the bundled model).",
        default=0, min=0, max=1024, step=16,
    )  # fmt: skip


class BAGELTextToImage:
    DESCRIPTION = (
        "Generates an image from a prompt, after everything in the context. With a context, the prompt may "
        "be empty: the image is drawn from what the context already asks for (e.g. a Think plan)."
    )
    CATEGORY = f"{CATEGORY}/generate"
    RETURN_TYPES = ("IMAGE", CONTEXT)
    RETURN_NAMES = ("image", "context")
    OUTPUT_TOOLTIPS = ("The generated image.", "The context with the prompt and the image.")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "prompt": widget(
                    "STRING", "What to draw. May be empty with a context.", multiline=True, default=""
                ),
                "width": size_input("width"),
                "height": size_input("height"),
                "seed": seed_input(),
                **sampler_inputs(T2I_SETTINGS),
            },
            "optional": {"context": context_input(), "step_cache": step_cache_input()},
        }

    def generate(self, model, prompt, width, height, seed, context=None, **sampler):
        image, ctx = generate_image(
            model.ready(),
            prompt,
            context=context,
            height=height or None,
            width=width or None,
            settings=flow_settings(**sampler),
            seed=library_seed(seed),
            callback=Progress(),
        )
        return with_ui((to_image([image]), ctx), ctx)


class BAGELEdit:
    DESCRIPTION = (
        "Edits an image by an instruction. Without an image it edits the context's latest image: chain "
        "Edits through their contexts for a multi-turn edit. The output keeps the input's size after the "
        "model's resize rule."
    )
    CATEGORY = f"{CATEGORY}/generate"
    RETURN_TYPES = ("IMAGE", CONTEXT)
    RETURN_NAMES = ("image", "context")
    OUTPUT_TOOLTIPS = ("The edited image.", "The context with the instruction and the edited image.")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "instruction": widget(
                    "STRING", "How to change the image. May be empty when the context already holds the "
                    "request (e.g. a Think plan made with the image).",
                    multiline=True, default="",
                ),
                "seed": seed_input(),
                **sampler_inputs(EDIT_SETTINGS),
            },
            "optional": {
                "image": image_input("The image to edit; unconnected: the context's latest image."),
                "context": context_input(),
                "step_cache": step_cache_input(),
            },
        }  # fmt: skip

    def edit(self, model, instruction, seed, image=None, context=None, **sampler):
        edited, ctx = edit_image(
            model.ready(),
            None if image is None else to_pil(image),
            instruction,
            context=context,
            settings=flow_settings(**sampler),
            seed=library_seed(seed),
            callback=Progress(),
        )
        return with_ui((to_image([edited]), ctx), ctx)
