"""The five BAGEL tasks over a `Context`: understand, think, generate an image, edit, image sequences.

Each task takes a context (or starts one), does what the official `InterleaveInferencer` does with the
official per-task defaults, and returns its result with the extended context, so tasks chain. Each is a
short recipe: append to the context, run one of `engine.py`'s loops, append the result. The image tasks
are batch-aware (`generate_images`, `edit_images`, `generate_sequences`; a batch of one is the plain case)
and every option is keyword-only; what travels from a task to the sampler is one `engine.ImageRequest`.
Progress and interruption go through one optional `callback` (see `engine.StepCallback`): an exception
raised in it (ComfyUI's interrupt, for one) stops the task cleanly — a context is only ever replaced,
never half-written.

Thinking system prompts are the official strings, byte for byte (BAGEL_REFERENCE §5.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .context import Context, ContextError
from .engine import Answer, ImageRequest, StepCallback, TextSettings, decode_text, sample_images
from .images import resize_dims
from .model import BagelModel
from .sampling import EDIT_SETTINGS, T2I_SETTINGS, FlowSettings
from .tokenizer import check_text

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning "
    "process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
    "</think> image here"
)

THINK_TEXT_SETTINGS = TextSettings(max_new_tokens=1024)
IMAGE_POSITIONS = 2  # RoPE positions a drawn image takes in its context: its VAE part and its ViT part


def start(model: BagelModel, context: Context | None) -> Context:
    if context is None:
        return Context.empty(model)
    context.check_model(model)
    return context


def check_prompt(prompt: str, what: str = "prompt") -> str:
    """`prompt` if it is text the model can read; the error names the input (`what`) it came from."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the {what} is empty")
    return check_text(prompt, f"the {what}")


# -- text ------------------------------------------------------------------------------------------


def understand(
    model: BagelModel,
    question: str,
    *,
    image: Image.Image | None = None,
    context: Context | None = None,
    think: bool = False,
    settings: TextSettings = TextSettings(),
    seed: int = 0,
    callback: StepCallback | None = None,
) -> tuple[Answer, Context]:
    """Answer a question (about an image, or the context). The answer joins the returned context as text;
    `answer.stop` says whether it ended, hit max_new_tokens, or was cut at the model's position window.

    Official order: [thinking system prompt], image (ViT only), question, then decoding."""
    ctx = start(model, context)
    check_prompt(question, "question")
    if think:
        ctx = ctx.append_system_prompt(VLM_THINK_SYSTEM_PROMPT)
    if image is not None:
        ctx = ctx.append_image(image, vae=False, vit=True)
    ctx = ctx.append_text(question)
    answer = decode_text(model, ctx.cond, settings, seed, callback)
    return answer, ctx.append_text(answer) if answer.strip() else ctx


def think(
    model: BagelModel,
    instruction: str,
    *,
    image: Image.Image | None = None,
    context: Context | None = None,
    mode: str = "generate",
    settings: TextSettings = THINK_TEXT_SETTINGS,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> tuple[Answer, Context]:
    """Write a plan before acting. mode "generate": plan an image (then generate or edit from the returned
    context with no new prompt); mode "answer": reason to an answer. The thought joins the conditional
    history only, as in the official think mode."""
    if mode not in ("generate", "answer"):
        raise ValueError(f"think mode {mode!r} is unknown; choose 'generate' or 'answer'")
    ctx = start(model, context)
    check_prompt(instruction, "instruction")
    ctx = ctx.append_system_prompt(GEN_THINK_SYSTEM_PROMPT if mode == "generate" else VLM_THINK_SYSTEM_PROMPT)
    if image is not None:
        ctx = ctx.append_image(image, vae=mode == "generate", vit=True)
    ctx = ctx.append_text(instruction)
    thought = decode_text(model, ctx.cond, settings, seed, callback)
    if not thought.strip():
        return thought, ctx
    return thought, ctx.append_thought(thought)


# -- images ----------------------------------------------------------------------------------------


def check_size(model: BagelModel, height: int, width: int) -> None:
    stride, top = model.config.latent_downsample, model.config.max_image_side
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < stride or v % stride or v > top:
            raise ValueError(f"{name} {v} must be a multiple of {stride} between {stride} and {top}")


@dataclass(frozen=True)
class Images:
    """A batch of generated images, their latents, and the context that continues from each."""

    images: list[Image.Image]
    latents: torch.Tensor  # (B, z, H/8, W/8) in the model's scaled latent space
    contexts: list[Context]


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def render(
    model: BagelModel,
    contexts: list[Context],
    request: ImageRequest,
    *,
    callback: StepCallback | None = None,
    append_result: bool = True,
) -> Images:
    """Generate at the end of each context (together), then append each image (clean, VAE + ViT) to its
    context so the next step sees it; with `append_result=False` the contexts are returned as they were
    (one-shot use: encoding a result costs a VAE encode, a ViT pass and a prefill that nothing would
    read)."""
    check_size(model, request.height, request.width)
    for ctx in contexts:  # sampling takes one position; appending the result takes two (VAE + ViT)
        ctx.check_fits(IMAGE_POSITIONS if append_result else 1)
    images, grids = sample_images(model, contexts, request, callback)
    if append_result:
        contexts = [ctx.append_image(image) for ctx, image in zip(contexts, images, strict=True)]
    return Images(images, grids, contexts)


def generate_images(
    model: BagelModel,
    prompt: str | None,
    *,
    context: Context | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSettings = T2I_SETTINGS,
    seed: int | None = 0,
    batch_size: int = 1,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    append_result: bool = True,
) -> Images:
    """Text-to-image, `batch_size` images from seeds seed, seed + 1, ... sampled together. `prompt` may be
    None to generate from a context that already holds the request (after `think`, say). Size defaults
    to the model's default output size. Each returned context holds its image, unless `append_result` is
    False (then each is the context ending with the prompt). `latents` (B, z, H/8, W/8) replace the
    seeds' noise."""
    _check_batch(batch_size)
    ctx = start(model, context)
    if prompt is not None and prompt.strip():
        ctx = ctx.append_text(check_prompt(prompt))
    elif not ctx.cond.segments:
        raise ValueError("the prompt is empty and there is no context to generate from")
    height = model.config.inference.default_height if height is None else height
    width = model.config.inference.default_width if width is None else width
    request = ImageRequest(height, width, settings, seed, latents)
    return render(model, [ctx] * batch_size, request, callback=callback, append_result=append_result)


def edit_images(
    model: BagelModel,
    images: list[Image.Image] | None,
    instruction: str | None,
    *,
    context: Context | None = None,
    image_latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSettings = EDIT_SETTINGS,
    seed: int | None = 0,
    batch_size: int = 1,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    append_result: bool = True,
) -> Images:
    """Edit each of `images` (each appended VAE + ViT to its own copy of the context) by `instruction`,
    all sampled together; one image, or with `images=None` the latest image of the context (a multi-turn
    edit chain: earlier turns are not re-encoded), is edited `batch_size` times. Item b uses seed + b.
    `image_latents` (N, z, H/8, W/8), the images' latents when known (a LATENT input), replace encoding
    them. The output size defaults to the inputs' size after the official resize (a batch shares one)."""
    _check_batch(batch_size)
    ctx = start(model, context)
    has_instruction = instruction is not None and instruction.strip()
    if images and not has_instruction:
        raise ValueError("the edit instruction is empty")
    if images:
        if len(images) > 1 and batch_size not in (1, len(images)):
            raise ValueError(
                f"{len(images)} images to edit and batch_size {batch_size}: a batch is edited once per image "
                f"(image b with seed + b), so set batch_size to 1, or give one image to edit it {batch_size} "
                "times"
            )
        known = [None] * len(images) if image_latents is None else list(image_latents)
        contexts = [ctx.append_image(image, latent=z) for image, z in zip(images, known, strict=True)]
        contexts = contexts * batch_size if len(contexts) == 1 else contexts
    elif ctx.image_size is None:
        raise ValueError("edit needs an image, or a context that holds one")
    else:
        ctx.require_drawable_image("edit")
        contexts = [ctx] * batch_size
    if has_instruction:
        contexts = _append_once(contexts, check_prompt(instruction, "edit instruction"))
    sizes = {c.image_size for c in contexts}
    if len(sizes) > 1:
        raise ValueError(
            f"the images to edit have different sizes after the resize ({sorted(sizes)}); edit them one "
            "at a time or resize them to one size first"
        )
    h, w = sizes.pop()
    request = ImageRequest(
        h if height is None else height, w if width is None else width, settings, seed, latents
    )
    return render(model, contexts, request, callback=callback, append_result=append_result)


def check_image_latents(model: BagelModel, latents: torch.Tensor) -> None:
    """Refuse latents (N, z, H/8, W/8) of a picture size the model would resize, before anything is
    decoded: a latent is used as it is for the image tokens, and decoding an oversized one first costs
    minutes or all the memory there is (an upscaled 4096² latent asked for 274 GB)."""
    down = model.config.vae.downsample
    height, width = latents.shape[2] * down, latents.shape[3] * down
    kept = resize_dims(width, height, model.config.inference.vae_limits)
    if kept != (width, height):
        raise ContextError(
            f"a latent of {width}x{height} pixels is outside this model's image sizes (it would be resized "
            f"to {kept[0]}x{kept[1]})"
        )


def _append_once(contexts: list[Context], text: str) -> list[Context]:
    """`text` appended to each context, computed once per distinct context (a batch repeats one)."""
    done: dict[int, Context] = {}
    for ctx in contexts:
        if id(ctx) not in done:
            done[id(ctx)] = ctx.append_text(text)
    return [done[id(ctx)] for ctx in contexts]


def generate_sequences(
    model: BagelModel,
    prompts: list[str],
    *,
    context: Context | None = None,
    image: Image.Image | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSettings = EDIT_SETTINGS,
    seed: int | None = 0,
    batch_size: int = 1,
    callback: StepCallback | None = None,
) -> tuple[list[list[Image.Image]], list[Context]]:
    """`batch_size` image sequences side by side, one image per prompt: each is appended clean to its
    context before the next, so frame k conditions frame k+1 (multi-frame motion, world navigation).
    Frame k of item b uses seed + b + k. A side not given is the context's latest image's, or the
    model's default with no image. Returns each item's frames and its final context."""
    if not prompts:
        raise ValueError("a sequence needs at least one prompt")
    for prompt in prompts:
        check_prompt(prompt)
    _check_batch(batch_size)
    ctx = start(model, context)
    if image is not None:
        ctx = ctx.append_image(image)
    ctx.require_drawable_image("sequence")
    # resolved once: an appended frame is resized as an input, so its size is not the one asked for
    base_h, base_w = ctx.image_size or (
        model.config.inference.default_height,
        model.config.inference.default_width,
    )
    h, w = (base_h if height is None else height), (base_w if width is None else width)
    contexts, frames = [ctx] * batch_size, [[] for _ in range(batch_size)]
    for k, prompt in enumerate(prompts):
        contexts = _append_once(contexts, prompt)
        request = ImageRequest(h, w, settings, None if seed is None else seed + k)
        out = render(model, contexts, request, callback=callback)
        for item, frame in zip(frames, out.images, strict=True):
            item.append(frame)
        contexts = out.contexts
    return frames, contexts
