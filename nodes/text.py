"""Nodes that write text: Understand (answer a question) and Think (plan or reason before acting).

Both show their text on the node (web/bagel.js), with a note when decoding stopped before the model ended
the text (max_new_tokens, the position window), and are output nodes, so they run even when nothing is
connected to their outputs. While they decode, the text so far shows as ComfyUI's progress text (the hidden
`unique_id` input names the node to show it on).
"""

from __future__ import annotations

from ..bagel_model import TextSettings, think, understand
from ..bagel_model.tasks import THINK_TEXT_SETTINGS
from .comfy_bridge import LiveText, Progress
from .images import to_pil
from .sockets import (
    CATEGORY,
    CONTEXT,
    context_input,
    image_input,
    library_seed,
    model_input,
    node_id_input,
    seed_input,
    text_inputs,
    text_settings,
    widget,
    with_stop,
    with_ui,
)

THINK_MODES = {"plan-an-image": "generate", "reason-to-answer": "answer"}


class BAGELUnderstand:
    DESCRIPTION = "Answers a question about an image, or about the session in the context."
    CATEGORY = f"{CATEGORY}/understand"
    RETURN_TYPES = ("STRING", CONTEXT)
    RETURN_NAMES = ("answer", "context")
    OUTPUT_TOOLTIPS = ("The answer.", "The context with the image, the question and the answer.")
    OUTPUT_NODE = True
    FUNCTION = "answer"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "question": widget("STRING", "What to ask.", multiline=True, default="describe the image."),
                **text_inputs(TextSettings()),
                "seed": seed_input(),
            },
            "optional": {
                "image": image_input("The image to ask about; optional when the context holds the image."),
                "context": context_input(),
            },
            "hidden": node_id_input(),
        }

    def answer(
        self, model, question, max_new_tokens, do_sample, temperature, seed,
        image=None, context=None, unique_id=None,
    ):  # fmt: skip
        live = LiveText(unique_id, Progress())
        answer, ctx = understand(
            model.ready(),
            question,
            image=None if image is None else to_pil(image),
            context=context,
            settings=text_settings(max_new_tokens, do_sample, temperature),
            seed=library_seed(seed),
            callback=live,
        )
        live.finish(answer)
        return with_ui((answer, ctx), ctx, with_stop(answer, answer.stop))


class BAGELThink:
    DESCRIPTION = (
        "Writes a thought before acting: plan-an-image plans a picture (connect the context to Text to "
        "Image or Edit with an empty prompt to draw the plan); reason-to-answer reasons to an answer."
    )
    CATEGORY = f"{CATEGORY}/understand"
    RETURN_TYPES = ("STRING", CONTEXT)
    RETURN_NAMES = ("thought", "context")
    OUTPUT_TOOLTIPS = ("The thought, <think> ... </think> then the result.", "The context ending with it.")
    OUTPUT_NODE = True
    FUNCTION = "think"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "instruction": widget("STRING", "What to plan or answer.", multiline=True, default=""),
                "mode": widget(
                    list(THINK_MODES),
                    "plan-an-image: plan a picture to generate (or an edit, given an image). "
                    "reason-to-answer: think a question through before answering.",
                    default="plan-an-image",
                ),
                **text_inputs(THINK_TEXT_SETTINGS),
                "seed": seed_input(),
            },
            "optional": {
                "image": image_input("An image to plan an edit of, or to reason about."),
                "context": context_input(),
            },
            "hidden": node_id_input(),
        }

    def think(
        self, model, instruction, mode, max_new_tokens, do_sample, temperature, seed,
        image=None, context=None, unique_id=None,
    ):  # fmt: skip
        live = LiveText(unique_id, Progress())
        thought, ctx = think(
            model.ready(),
            instruction,
            image=None if image is None else to_pil(image),
            context=context,
            mode=THINK_MODES[mode],
            settings=text_settings(max_new_tokens, do_sample, temperature),
            seed=library_seed(seed),
            callback=live,
        )
        live.finish(thought)
        return with_ui((thought, ctx), ctx, with_stop(thought, thought.stop))
