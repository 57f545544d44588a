"""ComfyUI nodes for BAGEL: thin adapters from ComfyUI types to `bagel_model` tasks.

One table lists every node with its display name; ids and input names are a published contract (saved
workflows refer to them), so they are never renamed or reordered, and new inputs go last as optional.
"""

from __future__ import annotations

import sys

from . import comfy_bridge
from .context import BAGELContextAddImages, BAGELContextAddText
from .generate import BAGELEdit, BAGELTextToImage
from .loader import BAGELLoader
from .lora import BAGELLoraLoader
from .reason import BAGELReason
from .sequence import BAGELMultiFrame, BAGELNavigate
from .text import BAGELThink, BAGELUnderstand
from .train import BAGELTrainLora

NODES = {
    "BAGELLoader": (BAGELLoader, "BAGEL Loader"),
    "BAGELUnderstand": (BAGELUnderstand, "BAGEL Understand"),
    "BAGELThink": (BAGELThink, "BAGEL Think"),
    "BAGELTextToImage": (BAGELTextToImage, "BAGEL Text to Image"),
    "BAGELEdit": (BAGELEdit, "BAGEL Edit"),
    "BAGELMultiFrame": (BAGELMultiFrame, "BAGEL Multi-Frame"),
    "BAGELNavigate": (BAGELNavigate, "BAGEL Navigate"),
    "BAGELContextAddText": (BAGELContextAddText, "BAGEL Context Add Text"),
    "BAGELContextAddImages": (BAGELContextAddImages, "BAGEL Context Add Images"),
    "BAGELReason": (BAGELReason, "BAGEL Reason"),
    "BAGELLoraLoader": (BAGELLoraLoader, "BAGEL LoRA Loader"),
    "BAGELTrainLora": (BAGELTrainLora, "BAGEL Train LoRA"),
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}


def name_errors_by_class() -> None:
    """Relabel this pack's exception classes as builtins, the one module ComfyUI leaves out of an error's
    type name (it shows `module.Class` otherwise). ComfyUI imports the pack by its folder's path, so a
    LoRA error read '/.../custom_nodes/comfyui-bagel-mot.bagel_model.lora.LoraError'; now 'LoraError'.
    Only the copy ComfyUI loads is relabelled: the library imported on its own keeps its module names."""
    root = __name__.rpartition(".")[0]
    for name, module in list(sys.modules.items()):
        if name.startswith(f"{root}."):
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == name:
                    value.__module__ = "builtins"


comfy_bridge.register_model_folder()
name_errors_by_class()
