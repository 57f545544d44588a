"""Nodes that draw images: Text to Image and Edit.

Each returns its images, the context with the (first) image appended, so an Edit fed by another Edit's
context continues the same session (a multi-turn edit chain, nothing re-encoded), and the images as a
ComfyUI LATENT (nodes/latents.py). `batch_size` draws several items in one run, item b from seed + b:
exactly what a run of batch 1 with that seed draws.
"""

from __future__ import annotations

from ..bagel_model import EDIT_SETTINGS, T2I_SETTINGS, ContextError, edit_images, generate_images
from ..bagel_model.tasks import check_image_latents
from .comfy_bridge import Progress, previewer
from .images import to_image, to_pils
from .latents import LATENT, from_latent, to_latent
from .sockets import (
    CATEGORY,
    CONTEXT,
    batch_size_input,
    context_input,
    flow_settings,
    library_seed,
    model_input,
    sampler_inputs,
    seed_input,
    step_cache_input,
    widget,
    with_ui,
)


def size_input(side: str) -> tuple:
    # 0 by default: no single number suits both BAGEL-7B-MoT (1024) and the bundled 48 px model. The widget
    # cannot see the connected model, so max is the largest any model takes, and the tooltip names each
    # model's own limit; a size above it stops the run with an error naming the input and the limit.
    return widget(
        "INT",
        f"Image {side} in pixels, a multiple of 16 up to the connected model's limit: 1024 for "
        "BAGEL-7B-MoT, 256 for the bundled model (a larger value stops the run with an error naming the "
        "limit). 0: the model's default size (1024 for BAGEL-7B-MoT, 48 for the bundled model).",
        default=0, min=0, max=1024, step=16,
    )  # fmt: skip


class BAGELTextToImage:
    DESCRIPTION = (
        "Generates an image from a prompt, after everything in the context. With a context, the prompt may "
        "be empty: the image is drawn from what the context already asks for (e.g. a Think plan)."
    )
    CATEGORY = f"{CATEGORY}/generate"
    RETURN_TYPES = ("IMAGE", CONTEXT, LATENT)
    RETURN_NAMES = ("image", "context", "latent")
    OUTPUT_TOOLTIPS = (
        "The generated images (batch_size of them).",
        "The context with the prompt and the first image.",
        "The generated images as a LATENT in the model's autoencoder space (for BAGEL-7B-MoT, FLUX's: "
        "decodes with VAE Decode and FLUX's ae.safetensors); feeds Edit's latent input or core latent nodes.",
    )
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
            "optional": {
                "context": context_input(),
                "step_cache": step_cache_input(),
                "batch_size": batch_size_input("images"),
            },
        }

    def generate(self, model, prompt, width, height, seed, context=None, batch_size=1, **sampler):
        bagel = model.ready()
        out = generate_images(
            bagel,
            prompt,
            context=context,
            height=height or None,
            width=width or None,
            settings=flow_settings(**sampler),
            seed=library_seed(seed),
            batch_size=batch_size,
            callback=Progress(preview=previewer(bagel)),
        )
        ctx = out.contexts[0]
        return with_ui((to_image(out.images), ctx, to_latent(bagel, out.latents)), ctx)


class BAGELEdit:
    DESCRIPTION = (
        "Edits an image by an instruction. Without an image it edits the context's latest image: chain "
        "Edits through their contexts for a multi-turn edit. A batch of images (or latents) edits each. The "
        "output keeps the input's size after the model's resize rule."
    )
    CATEGORY = f"{CATEGORY}/generate"
    RETURN_TYPES = ("IMAGE", CONTEXT, LATENT)
    RETURN_NAMES = ("image", "context", "latent")
    OUTPUT_TOOLTIPS = (
        "The edited images: one per input image or latent, or batch_size of one image.",
        "The context with the first item's image, the instruction and its edited image.",
        "The edited images as a LATENT in the model's autoencoder space (see Text to Image's latent).",
    )
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
                "image": widget(
                    "IMAGE", "The image to edit, or a batch: each image is edited (image b with seed + b). "
                    "Unconnected: the context's latest image (one added to draw from: after Understand or "
                    "Think, which add theirs for understanding only, connect it here).",
                ),
                "context": context_input(),
                "step_cache": step_cache_input(),
                "batch_size": batch_size_input(
                    "edits of the one image (or of the context's latest image, or the one latent)"
                ),
                "latent": widget(
                    LATENT, "Instead of image: a LATENT to edit (from a BAGEL node or a core latent node; "
                    "for BAGEL-7B-MoT also VAE Encode with FLUX's ae.safetensors), used as it is for the "
                    "model's image tokens and decoded for its vision encoder. A batch edits each latent.",
                ),
            },
        }  # fmt: skip

    def edit(self, model, instruction, seed, image=None, context=None, batch_size=1, latent=None, **sampler):
        if image is not None and latent is not None:
            raise ValueError("image and latent are both connected: connect the one to edit")
        bagel = model.ready()
        settings, seed = flow_settings(**sampler), library_seed(seed)
        images, known = (None if image is None else to_pils(image)), None
        if latent is not None:  # used as it is for the image tokens, decoded for the vision encoder
            known = from_latent(bagel, latent)
            try:
                check_image_latents(bagel, known)
            except ContextError as e:
                raise ValueError(f"latent: {e}: Upscale Latent to a size this model takes") from None
            images = [bagel.decode_latent(z) for z in known]
        out = edit_images(
            bagel, images, instruction, context=context, image_latents=known, settings=settings, seed=seed,
            batch_size=batch_size, callback=Progress(preview=previewer(bagel)),
        )  # fmt: skip
        ctx = out.contexts[0]
        return with_ui((to_image(out.images), ctx, to_latent(bagel, out.latents)), ctx)
