"""BAGEL LoRA: a BAGEL_MODEL with a LoRA adapter from ComfyUI's `models/loras` applied at a strength.

Adapters are PEFT folders as BAGEL trainers save them (`adapter_config.json` + `adapter_model.safetensors`)
put under `models/loras/`; the list shows each such `adapter_model.safetensors` (files without a config
beside them are other models' LoRAs, or lack the adapter's scale). Reading and checking the adapter is the
library's (`bagel_model.lora`), patching ComfyUI's model is `comfy_bridge.with_lora`'s: the node never
changes the model it is given, so bypassing it gives the base model back.
"""

from __future__ import annotations

from pathlib import Path

from ..bagel_model import lora
from . import comfy_bridge
from .sockets import CATEGORY, MODEL, model_input, widget

LORA_FOLDER = "loras"  # ComfyUI's folder for every model's LoRAs
NO_ADAPTER = "(no adapter in models/loras)"


def adapters() -> dict[str, Path]:
    """Name -> path of each PEFT adapter file in ComfyUI's `loras` folders."""
    files = comfy_bridge.model_files(LORA_FOLDER)
    return {name: path for name, path in files.items() if (path.parent / lora.CONFIG_FILE).is_file()}


class BAGELLoraLoader:
    DESCRIPTION = (
        "Applies a LoRA adapter (PEFT format, as BAGEL trainers save it) to a BAGEL model. The output is a "
        "new model: the input stays as it was, LoRA nodes stack, and contexts built by the input model "
        "cannot be continued with this one."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied, for every BAGEL node of this chain.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        names = list(adapters()) or [NO_ADAPTER]
        return {
            "required": {
                "model": model_input(),
                "lora_name": widget(
                    names,
                    "A PEFT adapter under models/loras/: put the trainer's folder there (adapter_config.json "
                    "and adapter_model.safetensors) and pick its adapter_model.safetensors. Needs a model "
                    "loaded with weights native.",
                    default=names[0],
                ),
                "strength": widget(
                    "FLOAT",
                    "How much of the adapter to add: 1 as trained, 0 none, negative values subtract it.",
                    default=1.0, min=-10.0, max=10.0, step=0.01,
                ),
            }
        }  # fmt: skip

    def apply(self, model, lora_name, strength):
        found = adapters()
        if lora_name not in found:
            raise FileNotFoundError(
                f"LoRA {lora_name!r} is not in models/loras (found: {', '.join(found) or 'none'}); put the "
                "adapter's folder (adapter_config.json and adapter_model.safetensors) there"
            )
        return (comfy_bridge.with_lora(model, lora.read(found[lora_name]), strength),)
