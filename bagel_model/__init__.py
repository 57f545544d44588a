"""BAGEL (BAGEL-7B-MoT) in plain PyTorch: load the official checkpoint, build an interleaved KV-cached
context, and understand, think, generate, edit and continue images over it.

This package never imports ComfyUI; `nodes/` adapts it to ComfyUI.
"""

from .checkpoint import load
from .context import Context, ContextError
from .layout import CheckpointError
from .model import BagelModel
from .reasoning import PROTOCOLS, THINKMORPH, ZEBRA_COT, Reasoning, reason
from .sampling import EDIT_SETTINGS, T2I_SETTINGS, FlowSettings
from .tasks import (
    GEN_THINK_SYSTEM_PROMPT,
    VLM_THINK_SYSTEM_PROMPT,
    Images,
    TextSettings,
    edit_images,
    generate_images,
    generate_sequences,
    think,
    understand,
)

__all__ = [
    "EDIT_SETTINGS",
    "GEN_THINK_SYSTEM_PROMPT",
    "PROTOCOLS",
    "T2I_SETTINGS",
    "THINKMORPH",
    "VLM_THINK_SYSTEM_PROMPT",
    "ZEBRA_COT",
    "BagelModel",
    "CheckpointError",
    "Context",
    "ContextError",
    "FlowSettings",
    "Images",
    "Reasoning",
    "TextSettings",
    "edit_images",
    "generate_images",
    "generate_sequences",
    "load",
    "reason",
    "think",
    "understand",
]
