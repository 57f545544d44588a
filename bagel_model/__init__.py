"""BAGEL (BAGEL-7B-MoT) in plain PyTorch: load the official checkpoint, build an interleaved KV-cached
context, and understand, think, generate, edit and continue images over it.

This package never imports ComfyUI; `nodes/` adapts it to ComfyUI.
"""

from .checkpoint import CheckpointError, load
from .context import Context, ContextError
from .model import BagelModel
from .sampling import EDIT_SETTINGS, T2I_SETTINGS, FlowSettings
from .tasks import (
    GEN_THINK_SYSTEM_PROMPT,
    VLM_THINK_SYSTEM_PROMPT,
    TextSettings,
    edit_image,
    generate_image,
    generate_sequence,
    think,
    understand,
)

__all__ = [
    "EDIT_SETTINGS",
    "GEN_THINK_SYSTEM_PROMPT",
    "T2I_SETTINGS",
    "VLM_THINK_SYSTEM_PROMPT",
    "BagelModel",
    "CheckpointError",
    "Context",
    "ContextError",
    "FlowSettings",
    "TextSettings",
    "edit_image",
    "generate_image",
    "generate_sequence",
    "load",
    "think",
    "understand",
]
