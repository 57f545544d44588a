"""The inputs and outputs several BAGEL nodes share, declared once.

Socket types, the model / context / image inputs, the seed, the sampler and decoding widgets (their
defaults read from the library's official settings, so the two cannot drift apart), the conversion of those
widgets into library settings, and the `ui` payload that shows text and a context summary on the node.
Nothing here runs a model.
"""

from __future__ import annotations

from ..bagel_model import Context, FlowSettings, TextSettings, sampling
from ..bagel_model.engine import STOP_BUDGET, STOP_WINDOW
from ..bagel_model.reasoning import STOP_ROUNDS
from ..bagel_model.sampling import RENORM_TYPES

MODEL = "BAGEL_MODEL"
CONTEXT = "BAGEL_CONTEXT"
CATEGORY = "BAGEL"
SEED_MAX = 2**64 - 1  # ComfyUI's seed range: control_after_generate draws from all of it


def widget(kind: str | list[str], tooltip: str, **options) -> tuple:
    """One ComfyUI input spec: its type (or combo values), options (default, min, max, ...) and tooltip."""
    return (kind, {**options, "tooltip": tooltip})


def model_input() -> tuple:
    return widget(
        MODEL,
        "A BAGEL model from the BAGEL Loader. Every node of one chain must use the same loader output: "
        "a context remembers the model that built it.",
    )


def context_input() -> tuple:
    return widget(
        CONTEXT,
        "Optional: the session so far (text and images with their attention cache) from another BAGEL "
        "node, so this step sees everything before it. Not connected: a new session starts. A context is "
        "never modified, so one output can feed several branches.",
    )


def image_input(tooltip: str) -> tuple:
    return widget("IMAGE", tooltip + " One image: batches are refused.")


def node_id_input() -> dict[str, str]:
    """The hidden inputs of a node that shows live text: ComfyUI passes its id as `unique_id`, which names
    the node its progress text is shown on (never a widget, so workflows are unchanged)."""
    return {"unique_id": "UNIQUE_ID"}


BATCH_MAX = 16


def batch_size_input(what: str) -> tuple:
    """Optional (the last widget, so saved workflows keep their widget order)."""
    return widget(
        "INT", f"How many {what} to draw in one run, item b from seed + b (a batch of 1 with that seed gives "
        "the same result). The context output continues the first item.",
        default=1, min=1, max=BATCH_MAX,
    )  # fmt: skip


def seed_input() -> tuple:
    return widget(
        "INT",
        "Random seed. The same seed and inputs give the same result.",
        default=0, min=0, max=SEED_MAX, control_after_generate=True,
    )  # fmt: skip


def library_seed(seed: int) -> int:
    """The seed the library gets. Torch's generator takes any 64-bit seed, but a sequence seeds frame k
    with seed + k, so seeds are folded into 63 bits (every seed below 2**63 is passed unchanged)."""
    return seed % 2**63


# -- sampler widgets ----------------------------------------------------------------------------------


def sampler_inputs(defaults: FlowSettings) -> dict[str, tuple]:
    """The rectified-flow sampler's widgets, defaulting to `defaults` (the official per-task values)."""
    lo, hi = defaults.cfg_interval
    return {
        "steps": widget(
            "INT", "Denoising steps (official: 50). Fewer is faster and rougher.",
            default=defaults.num_steps, min=2, max=500,
        ),
        "cfg_text_scale": widget(
            "FLOAT", "How strongly the image follows the text (official range 4-8). 1 or less turns text "
            "guidance, and with it image guidance, off.",
            default=defaults.cfg_text_scale, min=0.0, max=20.0, step=0.1,
        ),
        "cfg_img_scale": widget(
            "FLOAT", "How strongly the result keeps the context's images (official range 1-2; 1 = off). "
            "Acts only together with text guidance above 1.",
            default=defaults.cfg_img_scale, min=0.0, max=20.0, step=0.1,
        ),
        "cfg_interval_start": widget(
            "FLOAT", "Guidance applies while the noise level t is in (start, end]; t runs from 1 (noise) "
            "to 0 (image).",
            default=lo, min=0.0, max=1.0, step=0.01,
        ),
        "cfg_interval_end": widget(
            "FLOAT", "Upper end of the guidance window (1 = from the first step).",
            default=hi, min=0.0, max=1.0, step=0.01,
        ),
        "timestep_shift": widget(
            "FLOAT", "Moves the steps toward high noise: higher favours layout, lower favours detail "
            "(official: 3).",
            default=defaults.timestep_shift, min=0.1, max=20.0, step=0.1,
        ),
        "cfg_renorm_type": widget(
            list(RENORM_TYPES), "How guided predictions are rescaled to the unguided norm: global "
            "(text-to-image), channel, or text_channel (editing; can blur).",
            default=defaults.renorm_type,
        ),
        "cfg_renorm_min": widget(
            "FLOAT", "Lowest rescale factor: 0 is the official value, 1 turns rescaling off.",
            default=defaults.renorm_min, min=0.0, max=1.0, step=0.01,
        ),
    }  # fmt: skip


def flow_settings(
    steps: int,
    cfg_text_scale: float,
    cfg_img_scale: float,
    cfg_interval_start: float,
    cfg_interval_end: float,
    timestep_shift: float,
    cfg_renorm_type: str,
    cfg_renorm_min: float,
    step_cache: int = 1,
) -> FlowSettings:
    """The sampler widgets as library settings (which check them and name any bad value)."""
    return sampling.flow_settings(
        FlowSettings(),
        steps=steps,
        cfg_text_scale=cfg_text_scale,
        cfg_img_scale=cfg_img_scale,
        cfg_interval_start=cfg_interval_start,
        cfg_interval_end=cfg_interval_end,
        timestep_shift=timestep_shift,
        renorm_type=cfg_renorm_type,
        renorm_min=cfg_renorm_min,
        step_cache=step_cache,
    )


def step_cache_input() -> tuple:
    """Optional (the last input, so saved workflows keep their widget order)."""
    return widget(
        "INT", "1: the exact official sampler. k > 1: run the model on every k-th step only and extrapolate "
        "between (about k times fewer passes; an approximation).",
        default=1, min=1, max=8,
    )  # fmt: skip


# -- decoding widgets ---------------------------------------------------------------------------------


def text_inputs(defaults: TextSettings) -> dict[str, tuple]:
    """Text decoding widgets, defaulting to the official values (greedy decoding)."""
    return {
        "max_new_tokens": widget(
            "INT", "Most tokens to write; decoding stops earlier at the end of the answer.",
            default=defaults.max_new_tokens, min=1, max=16384,
        ),
        "do_sample": widget(
            "BOOLEAN", "Off: always the most likely token (official default; the seed has no effect). "
            "On: sample with the temperature and the seed.",
            default=defaults.do_sample,
        ),
        "temperature": widget(
            "FLOAT", "Sampling temperature, used only when do_sample is on.",
            default=defaults.temperature, min=0.01, max=2.0, step=0.01,
        ),
    }  # fmt: skip


def text_settings(max_new_tokens: int, do_sample: bool, temperature: float) -> TextSettings:
    return TextSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)


# -- outputs ------------------------------------------------------------------------------------------


STOP_NOTES = {
    STOP_BUDGET: "it reached max_new_tokens",
    STOP_WINDOW: "the model's position window is full",
    STOP_ROUNDS: "max_rounds images were drawn and the last segment asked for another",
}


def with_stop(text: str, stop: str) -> str:
    """`text` as the node shows it: followed by why decoding stopped when the model did not end it (the
    STRING output keeps the text alone)."""
    note = STOP_NOTES.get(stop)
    return text if note is None else f"{text}\n[stopped: {note}]"


def with_ui(result: tuple, context: Context, text: str | None = None) -> dict:
    """A node's return value that also shows `text` and a one-line context summary on the node (read by
    web/bagel.js; the summary also lands in /history for headless clients)."""
    ui = {"context": [context.summary()]}
    if text is not None:
        ui["text"] = [text]
    return {"ui": ui, "result": result}
