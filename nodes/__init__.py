"""ComfyUI nodes for BAGEL: thin adapters from ComfyUI types to `bagel_model` tasks.

One table lists every node with its display name; ids and input names are a published contract (saved
workflows refer to them), so they are never renamed or reordered, and new inputs go last as optional.
"""

from __future__ import annotations

from . import comfy_bridge
from .context import BAGELContextAddImages, BAGELContextAddText
from .generate import BAGELEdit, BAGELTextToImage
from .loader import BAGELLoader
from .lora import BAGELLoraLoader
from .reason import BAGELReason
from .sequence import BAGELMultiFrame, BAGELNavigate
from .text import BAGELThink, BAGELUnderstand

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
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}

comfy_bridge.register_model_folder()
