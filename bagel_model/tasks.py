"""The five BAGEL tasks over a `Context`: understand, think, generate an image, edit, image sequences.

Each task takes a context (or starts one), does what the official `InterleaveInferencer` does with the
official per-task defaults, and returns its result with the extended context, so tasks chain. Each is a
short recipe: append to the context, run one of `engine.py`'s loops, append the result. Progress and
interruption go through one optional `callback` (see `engine.StepCallback`): an exception raised in it
(ComfyUI's interrupt, for one) stops the task cleanly — a context is only ever replaced, never
half-written.

Thinking system prompts are the official strings, byte for byte (BAGEL_REFERENCE §5.4).
"""

from __future__ import annotations

import torch
from PIL import Image

from .context import Context
from .engine import Answer, StepCallback, TextSettings, decode_text, sample_image
from .model import BagelModel
from .sampling import EDIT_SETTINGS, T2I_SETTINGS, FlowSettings

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


def _start(model: BagelModel, context: Context | None) -> Context:
    if context is None:
        return Context.empty(model)
    context.check_model(model)
    return context


def _check_prompt(prompt: str, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the {what} is empty")
    return prompt


# -- text ------------------------------------------------------------------------------------------


def understand(
    model: BagelModel,
    question: str,
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
    ctx = _start(model, context)
    _check_prompt(question, "question")
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
    ctx = _start(model, context)
    _check_prompt(instruction, "instruction")
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


def _render(
    model: BagelModel,
    ctx: Context,
    height: int,
    width: int,
    settings: FlowSettings,
    seed: int | None,
    latents: torch.Tensor | None,
    callback: StepCallback | None,
    append_result: bool,
) -> tuple[Image.Image, Context]:
    """Generate at the end of `ctx`, then append the image (clean, VAE + ViT) so the next step sees it;
    with `append_result=False` return `ctx` as it was (one-shot use: encoding the result costs a VAE
    encode, a ViT pass and a prefill that nothing would read)."""
    check_size(model, height, width)
    ctx.check_fits(1)
    image = sample_image(model, ctx, height, width, settings, seed, latents, callback)
    return image, ctx.append_image(image) if append_result else ctx


def generate_image(
    model: BagelModel,
    prompt: str | None,
    context: Context | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSettings = T2I_SETTINGS,
    seed: int | None = 0,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    append_result: bool = True,
) -> tuple[Image.Image, Context]:
    """Text-to-image. `prompt` may be None to generate from a context that already holds the request
    (after `think`, say). Size defaults to the model's default output size. The returned context holds
    the image, unless `append_result` is False (then it ends with the prompt)."""
    ctx = _start(model, context)
    if prompt is not None and prompt.strip():
        ctx = ctx.append_text(prompt)
    elif not ctx.cond.segments:
        raise ValueError("the prompt is empty and there is no context to generate from")
    height = model.config.inference.default_height if height is None else height
    width = model.config.inference.default_width if width is None else width
    return _render(model, ctx, height, width, settings, seed, latents, callback, append_result)


def edit_image(
    model: BagelModel,
    image: Image.Image | None,
    instruction: str | None,
    context: Context | None = None,
    settings: FlowSettings = EDIT_SETTINGS,
    seed: int | None = 0,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    callback: StepCallback | None = None,
    append_result: bool = True,
) -> tuple[Image.Image, Context]:
    """Edit `image` (appended VAE + ViT) by `instruction`. With `image=None`, edit the latest image of the
    context (a multi-turn edit chain: earlier turns are not re-encoded). The output size defaults to the
    input's size after the official resize. `append_result` as in `generate_image`."""
    ctx = _start(model, context)
    if image is not None:
        ctx = ctx.append_image(image)
    elif ctx.image_size is None:
        raise ValueError("edit needs an image, or a context that holds one")
    if instruction is not None and instruction.strip():
        ctx = ctx.append_text(instruction)
    elif image is not None:
        raise ValueError("the edit instruction is empty")
    h, w = ctx.image_size
    height, width = (h if height is None else height), (w if width is None else width)
    return _render(model, ctx, height, width, settings, seed, latents, callback, append_result)


def generate_sequence(
    model: BagelModel,
    prompts: list[str],
    context: Context | None = None,
    image: Image.Image | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSettings = EDIT_SETTINGS,
    seed: int | None = 0,
    callback: StepCallback | None = None,
) -> tuple[list[Image.Image], Context]:
    """Several images in a row, one per prompt: each is appended clean to the context before the next,
    so frame k conditions frame k+1 (multi-frame motion, world navigation). The seed advances per image."""
    if not prompts:
        raise ValueError("a sequence needs at least one prompt")
    ctx = _start(model, context)
    if image is not None:
        ctx = ctx.append_image(image)
    if ctx.image_size is None and (height is None or width is None):
        height = model.config.inference.default_height if height is None else height
        width = model.config.inference.default_width if width is None else width
    frames = []
    for k, prompt in enumerate(prompts):
        _check_prompt(prompt)
        ctx = ctx.append_text(prompt)
        h, w = (height, width) if height and width else ctx.image_size
        frame_seed = None if seed is None else seed + k
        frame, ctx = _render(model, ctx, h, w, settings, frame_seed, None, callback, append_result=True)
        frames.append(frame)
    return frames, ctx
