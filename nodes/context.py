"""Nodes that build a context without drawing or answering: Add Text and Add Images.

They compose an interleaved session by hand: image A, image B, "put the cat from the first image into the
second", then Text to Image, Edit, Understand or Reason continue it (multi-reference generation is exactly
this). Each returns a new context; the one it was given is never modified.
"""

from __future__ import annotations

from ..bagel_model.tasks import start
from .comfy_bridge import Progress
from .images import to_pils
from .sockets import CATEGORY, CONTEXT, context_input, model_input, widget, with_ui

IMAGE_MODES = {"vae+vit": {"vae": True, "vit": True}, "vit": {"vae": False, "vit": True}}


class BAGELContextAddText:
    DESCRIPTION = (
        "Appends text to the context, as a prompt would join it: the next image node's text guidance "
        "compares with and without this text."
    )
    CATEGORY = f"{CATEGORY}/context"
    RETURN_TYPES = (CONTEXT,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("The context followed by the text.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "text": widget(
                    "STRING", "The text to append, e.g. an instruction about the images before it.",
                    multiline=True, default="",
                ),
            },
            "optional": {"context": context_input()},
        }  # fmt: skip

    def add(self, model, text, context=None):
        ctx = start(model.ready(), context).append_text(text)
        return with_ui((ctx,), ctx)


class BAGELContextAddImages:
    DESCRIPTION = (
        "Appends images to the context, one after another in batch order (batch them with Batch Images). "
        "Then Text to Image or Edit can draw from several references, or Understand compare them."
    )
    CATEGORY = f"{CATEGORY}/context"
    RETURN_TYPES = (CONTEXT,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("The context followed by the images.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "images": widget("IMAGE", "The images to append: a batch appends each, in order."),
                "mode": widget(
                    list(IMAGE_MODES),
                    "vae+vit: the image as the model both draws from it (image tokens) and sees it (vision "
                    "encoder), as Edit appends it: for generation and editing. vit: seen only, for "
                    "understanding (Understand, Think, Reason); fewer tokens.",
                    default="vae+vit",
                ),
            },
            "optional": {"context": context_input()},
        }

    def add(self, model, images, mode, context=None):
        ctx = start(model.ready(), context)
        pictures = to_pils(images)
        progress = Progress()
        for k, picture in enumerate(pictures):
            ctx = ctx.append_image(picture, **IMAGE_MODES[mode])
            progress(k + 1, len(pictures), ctx)
        return with_ui((ctx,), ctx)
