"""comfyui-bagel-mot: BAGEL (ByteDance-Seed's unified multimodal MoT model) as ComfyUI nodes.

ComfyUI imports this folder as a package by its path (the folder name has dashes), so everything below
is imported relatively; the same package imports without ComfyUI for tests and scripts.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
