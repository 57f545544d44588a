"""Visual chain-of-thought: decode, and when the text asks for a picture, draw it, append it, go on.

BAGEL fine-tunes that reason in pictures alternate text and generated images in one context until a final
answer. Two protocols are implemented as their official inference code runs them (strings byte for byte):

- ThinkMorph (ThinkMorph/ThinkMorph-7B; `inferencer.py`, VLMEvalKit_Thinkmorph): system prompt, the image,
  then the question. A text segment that contains `<image_start>` asks for an image; the first one that
  does not ends the loop (it holds `<answer>...</answer>`), as do 3 images. Thoughts and drawn images join
  the conditional history only: guidance keeps [system, image] without the question and [system, question]
  without images for the whole loop.
- Zebra-CoT (multimodal-reasoning-lab/Bagel-Zebra-CoT; `infz_bf16.py`): system prompt, the question, then
  the image. Every text segment without "Final Answer:" or `<answer>` asks for an image; there is no round
  cap officially (ours: `max_rounds`). The official script rebuilds the context on every call, with images
  ViT-only for text turns and VAE + ViT for image turns; two incrementally extended contexts reproduce
  exactly that without re-encoding anything: a text view (images ViT-only) that text is decoded from, and
  an image view (VAE + ViT, with the usual CFG histories) that images are drawn from.

Both draw with cfg_text 4, cfg_img 2, interval [0, 1], shift 3, text_channel renorm (= EDIT_SETTINGS) at
the size of the latest image, and sample text at temperature 0.3.

A loop ends at the final answer, at a segment that asks for no image, after `max_rounds` images, or when a
segment hits its token budget or the model's position window (`Reasoning.stop` says which).

The callback's text is the transcript so far, so a caller streams the whole loop as one text: while a
segment decodes it grows by the segment's text, and as a picture starts (step 0 of its denoising) it ends
with a `[drawing image k]` marker, which becomes `[image k]` once the picture is drawn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from .context import Context
from .engine import STOP_END, STOP_WINDOW, ImageRequest, StepCallback, TextSettings, decode_text
from .model import BagelModel
from .sampling import EDIT_SETTINGS, FlowSettings
from .tasks import IMAGE_POSITIONS, check_prompt, render, start

THINKMORPH_SYSTEM_PROMPT = (
    "\nLet's think step by step to answer the question. For text-based thinking, enclose the process within "
    "<think> </think>, e.g. <think> thinking process here </think>. For visual thinking, enclose the content "
    "within <image_start> </image_end>, e.g. <image_start> thinking image here </image_end>. Finally "
    "conclude with the final answer wrapped in <answer></answer> tags, i.e.<answer> answer here </answer>.\n"
)
ZEBRA_COT_SYSTEM_PROMPT = (
    "You are an AI reasoning assistant capable of step-by-step interleaved text and visual chain of thought. "
    "Think step by step and use visual aids to enhance your problem-solving. Provide your final conclusion "
    'clearly in the format of "Final Answer: <answer here>"'
)

STOP_ANSWER, STOP_NO_IMAGE, STOP_ROUNDS = "answer", "no_image_request", "max_rounds"


@dataclass(frozen=True)
class Protocol:
    """How a fine-tune asks for images and ends its reasoning."""

    name: str
    system_prompt: str
    image_first: bool  # the input image before the question (ThinkMorph) or after it (Zebra-CoT)
    image_marker: str | None  # text that asks for an image; None: every non-final segment does
    final_markers: tuple[str, ...]  # text that holds the final answer
    fixed_guidance: bool  # thoughts and drawn images join the conditional history only
    separate_views: bool  # text turns see images ViT-only (Zebra-CoT's rebuilt contexts)
    max_rounds: int  # images drawn at most (the official cap, or ours where there is none)
    text: TextSettings

    def is_final(self, text: str) -> bool:
        return any(m in text for m in self.final_markers)

    def wants_image(self, text: str) -> bool:
        return self.image_marker in text if self.image_marker else not self.is_final(text)


THINKMORPH = Protocol(
    name="thinkmorph",
    system_prompt=THINKMORPH_SYSTEM_PROMPT,
    image_first=True,
    image_marker="<image_start>",
    final_markers=(),  # the loop ends at the first segment that asks for no image
    fixed_guidance=True,
    separate_views=False,
    max_rounds=3,
    text=TextSettings(max_new_tokens=4096, do_sample=True, temperature=0.3),
)
ZEBRA_COT = Protocol(
    name="zebra-cot",
    system_prompt=ZEBRA_COT_SYSTEM_PROMPT,
    image_first=False,
    image_marker=None,
    final_markers=("Final Answer:", "<answer>"),
    fixed_guidance=False,
    separate_views=True,
    max_rounds=8,
    text=TextSettings(max_new_tokens=1000, do_sample=True, temperature=0.3),
)
PROTOCOLS = {p.name: p for p in (THINKMORPH, ZEBRA_COT)}


@dataclass(frozen=True)
class Reasoning:
    """What a reasoning loop produced."""

    answer: str  # the final answer (inside <answer> / after "Final Answer:" when present)
    texts: list[str]  # every decoded segment, in order
    images: list[Image.Image]  # every drawn image, in order (image k follows texts[k])
    context: Context  # the whole interleaved history, ready for a next node
    stop: str  # STOP_ANSWER, STOP_NO_IMAGE, STOP_ROUNDS, or the last segment's decoding stop

    @property
    def transcript(self) -> str:
        return transcript(self.texts, len(self.images))


def transcript(texts: list[str], images: int, drawing: bool = False) -> str:
    """Every text segment in order, with `[image k]` where picture k was drawn (image k follows
    texts[k - 1]); `drawing`: picture `images + 1` is being drawn after the last segment."""
    parts = []
    for k, text in enumerate(texts):
        parts.append(text)
        if k < images:
            parts.append(f"[image {k + 1}]")
    if drawing:
        parts.append(f"[drawing image {images + 1}]")
    return "\n".join(parts)


def final_answer(text: str) -> str:
    """The answer inside `<answer>...</answer>`, after "Final Answer:" when it says so, else the text."""
    match = re.search(r"<answer>(.*?)(?:</answer>|$)", text, re.DOTALL)
    answer = match.group(1) if match else text
    if "Final Answer:" in answer:
        answer = answer.split("Final Answer:", 1)[1]
    return answer.strip()


@dataclass(frozen=True)
class _Views:
    """The context images are drawn from, and the one text is decoded from (the same for ThinkMorph)."""

    image: Context
    text: Context

    def add_text(self, text: str, protocol: Protocol, cond_only: bool) -> _Views:
        image = self.image.append_thought(text) if cond_only else self.image.append_text(text)
        if not protocol.separate_views:
            return _Views(image, image)
        return _Views(image, self.text.append_thought(text) if cond_only else self.text.append_text(text))

    def add_image(self, image: Image.Image, protocol: Protocol, cond_only: bool) -> _Views:
        drawn = self.image.append_image(image, cond_only=cond_only)
        if not protocol.separate_views:
            return _Views(drawn, drawn)
        return _Views(drawn, self.text.append_image(image, vae=False, cond_only=cond_only))


def reason(
    model: BagelModel,
    question: str,
    image: Image.Image | None = None,
    context: Context | None = None,
    protocol: Protocol = THINKMORPH,
    max_rounds: int | None = None,
    text_settings: TextSettings | None = None,
    flow_settings: FlowSettings = EDIT_SETTINGS,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> Reasoning:
    """Reason about `question` (and `image`) in text and pictures by `protocol` until a final answer.

    Round k decodes with seed + k and draws its image with seed + k. `max_rounds` caps the images drawn
    (default: the protocol's); `text_settings` overrides the protocol's decoding per segment."""
    check_prompt(question, "question")
    max_rounds = protocol.max_rounds if max_rounds is None else max_rounds
    if max_rounds < 0:
        raise ValueError(f"max_rounds must not be negative, got {max_rounds}")
    text_settings = text_settings or protocol.text
    views = _opening(start(model, context), question, image, protocol)
    texts: list[str] = []
    images: list[Image.Image] = []
    while True:
        live = None if callback is None else _transcript_callback(callback, tuple(texts), len(images))
        segment = decode_text(model, views.text.cond, text_settings, seed + len(texts), live)
        texts.append(segment)
        views = (
            views.add_text(segment, protocol, cond_only=protocol.fixed_guidance) if segment.strip() else views
        )
        stop = _stop(protocol, segment, len(images), max_rounds)
        if stop is None and min(views.text.room, views.image.room) < IMAGE_POSITIONS:
            stop = STOP_WINDOW  # a picture drawn now could not join the context: do not sample it
        if stop is not None:
            return Reasoning(final_answer(segment), texts, images, views.image, stop)
        if callback is not None:
            callback(0, flow_settings.num_steps - 1, transcript(texts, len(images), drawing=True))
        drawn = _draw(model, views.image, flow_settings, seed + len(images), callback)
        images.append(drawn)
        views = views.add_image(drawn, protocol, cond_only=protocol.fixed_guidance)


def _transcript_callback(callback: StepCallback, texts: tuple[str, ...], images: int) -> StepCallback:
    """`callback` for the segment after `texts` and `images` pictures: its text so far becomes the
    transcript so far."""

    def report(step: int, total: int, text: str) -> None:
        callback(step, total, transcript([*texts, text], images))

    return report


def _opening(ctx: Context, question: str, image: Image.Image | None, protocol: Protocol) -> _Views:
    """System prompt, then the image and the question in the protocol's order."""
    system = ctx.append_system_prompt(protocol.system_prompt)
    views = _Views(system, system)

    def add_question(v: _Views) -> _Views:
        return v.add_text(question, protocol, cond_only=False)

    def add_image(v: _Views) -> _Views:
        return v if image is None else v.add_image(image, protocol, cond_only=False)

    first, second = (add_image, add_question) if protocol.image_first else (add_question, add_image)
    return second(first(views))


def _stop(protocol: Protocol, segment, images: int, max_rounds: int) -> str | None:
    """Why the loop ends after `segment`, or None to draw the image it asks for."""
    if protocol.is_final(segment):
        return STOP_ANSWER
    if segment.stop != STOP_END:
        return segment.stop  # the token budget or the window cut the segment: no request to act on
    if not protocol.wants_image(segment):
        return STOP_NO_IMAGE
    if images >= max_rounds:
        return STOP_ROUNDS
    return None


def _draw(
    model: BagelModel, ctx: Context, settings: FlowSettings, seed: int, callback: StepCallback | None
) -> Image.Image:
    """An image at the end of `ctx`, the size of its latest image (or the model's default size)."""
    cfg = model.config.inference
    height, width = ctx.image_size or (cfg.default_height, cfg.default_width)
    request = ImageRequest(height, width, settings, seed)
    return render(model, [ctx], request, callback=callback, append_result=False).images[0]
