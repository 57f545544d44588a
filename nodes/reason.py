"""Reason: visual chain-of-thought, text and drawn pictures in turn until a final answer.

The loop is the library's (`bagel_model.reasoning`, ThinkMorph and Zebra-CoT as their official inference
runs them); the node converts the widgets, joins progress across the rounds, and shows the transcript: as
it grows (ComfyUI's progress text, a marker where a picture is being drawn), and whole when it is done.
"""

from __future__ import annotations

from ..bagel_model import EDIT_SETTINGS, PROTOCOLS, THINKMORPH, ZEBRA_COT, reason
from .comfy_bridge import LiveText, Progress, no_output, previewer
from .images import to_image, to_pil
from .sockets import (
    CATEGORY,
    CONTEXT,
    context_input,
    flow_settings,
    image_input,
    library_seed,
    model_input,
    node_id_input,
    sampler_inputs,
    seed_input,
    step_cache_input,
    text_inputs,
    text_settings,
    widget,
    with_stop,
    with_ui,
)


class BAGELReason:
    DESCRIPTION = (
        "Reasons about a question in text and pictures: when the model asks for a picture (by its protocol) "
        "it is drawn and appended, and decoding goes on after it, until a final answer. For BAGEL fine-tunes "
        "trained that way (ThinkMorph-7B, Bagel-Zebra-CoT); the transcript shows on the node."
    )
    CATEGORY = f"{CATEGORY}/understand"
    RETURN_TYPES = ("STRING", "STRING", "IMAGE", CONTEXT)
    RETURN_NAMES = ("answer", "transcript", "images", "context")
    OUTPUT_TOOLTIPS = (
        "The final answer (inside <answer> or after 'Final Answer:' when the model wrote them, else its last "
        "text).",
        "Every text segment in order, with [image k] where picture k was drawn.",
        "The pictures drawn while reasoning, in order, at the size of the latest image. When none was drawn "
        "this output is empty and the nodes fed by it are skipped (no error).",
        "The whole interleaved history (question, thoughts, pictures, answer), for a next node.",
    )
    OUTPUT_NODE = True
    FUNCTION = "reason"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": model_input(),
                "question": widget("STRING", "What to reason about.", multiline=True, default=""),
                "mode": widget(
                    list(PROTOCOLS),
                    "The fine-tune's protocol. thinkmorph (ThinkMorph-7B): a segment with <image_start> asks "
                    "for a picture, the first without one ends. zebra-cot (Bagel-Zebra-CoT): every segment "
                    "until 'Final Answer:' asks for a picture.",
                    default=THINKMORPH.name,
                ),
                "max_rounds": widget(
                    "INT", "Most pictures to draw: a request for one more ends the loop. -1: the mode's "
                    f"(thinkmorph: {THINKMORPH.max_rounds}, ThinkMorph's official cap; zebra-cot: "
                    f"{ZEBRA_COT.max_rounds}, as Zebra-CoT has none).",
                    default=-1, min=-1, max=16,
                ),
                **text_inputs(THINKMORPH.text),
                # replaces text_inputs' widget where it stands (a dict keeps a key's first position)
                "max_new_tokens": widget(
                    "INT", "Most tokens per text segment; decoding stops earlier at the segment's end. 0: "
                    f"the mode's (thinkmorph: {THINKMORPH.text.max_new_tokens}, zebra-cot: "
                    f"{ZEBRA_COT.text.max_new_tokens}, as each runs officially).",
                    default=0, min=0, max=16384,
                ),
                "seed": seed_input(),
                **sampler_inputs(EDIT_SETTINGS),
            },
            "optional": {
                "image": image_input("The image the question is about."),
                "context": context_input(),
                "step_cache": step_cache_input(),
            },
            "hidden": node_id_input(),
        }  # fmt: skip

    def reason(
        self, model, question, mode, max_rounds, max_new_tokens, do_sample, temperature, seed,
        image=None, context=None, unique_id=None, **sampler,
    ):  # fmt: skip
        bagel = model.ready()
        # a widget's default cannot follow the mode widget, so -1 rounds and 0 tokens stand for the mode's
        protocol = PROTOCOLS[mode]
        max_rounds = protocol.max_rounds if max_rounds < 0 else max_rounds
        max_new_tokens = max_new_tokens or protocol.text.max_new_tokens
        live = LiveText(unique_id, Progress(runs=None, preview=previewer(bagel)))
        out = reason(
            bagel,
            question,
            image=None if image is None else to_pil(image),
            context=context,
            protocol=protocol,
            max_rounds=max_rounds,
            text_settings=text_settings(max_new_tokens, do_sample, temperature),
            flow_settings=flow_settings(**sampler),
            seed=library_seed(seed),
            callback=live,
        )
        live.finish(out.transcript)
        images = to_image(out.images) if out.images else no_output()
        result = (out.answer, out.transcript, images, out.context)
        return with_ui(result, out.context, with_stop(out.transcript, out.stop))
