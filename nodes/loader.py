"""BAGEL Loader: a model folder (official Hugging Face layout) to a BAGEL_MODEL.

Models are the bundled tiny one (always first, needs no file) and every subfolder of ComfyUI's
`models/bagel/` holding `ema.safetensors`. Nothing is downloaded unless the user switches it on.
"""

from __future__ import annotations

from pathlib import Path

from .. import bagel_model
from ..bagel_model import bundled
from ..bagel_model.checkpoint import DTYPE_CHOICES, REQUIRED_FILES, resolve_dtype
from ..bagel_model.layers.attention import BACKENDS
from ..bagel_model.quant import WEIGHT_MODES
from . import comfy_bridge
from .sockets import CATEGORY, MODEL, widget

OFFICIAL_REPO = "ByteDance-Seed/BAGEL-7B-MoT"


def local_models() -> dict[str, Path]:
    """Name -> folder of each model under the `bagel` model folders (the first folder wins a name)."""
    found: dict[str, Path] = {}
    for root in comfy_bridge.model_roots():
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if (folder / "ema.safetensors").is_file():
                    found.setdefault(folder.name, folder)
    return found


def find_model(name: str) -> Path:
    if name == bundled.DEFAULT_NAME:
        return bundled.default_model_dir()
    models = local_models()
    if name not in models:
        roots = ", ".join(str(r) for r in comfy_bridge.model_roots()) or "none (ComfyUI is not running)"
        raise FileNotFoundError(
            f"BAGEL model {name!r} was not found; model folders: {roots}. Put the model's folder there "
            "(official layout: ema.safetensors, ae.safetensors, llm_config.json, vit_config.json, tokenizer "
            "files), or switch on download_if_missing."
        )
    return models[name]


def download(repo_id: str) -> Path:
    """`models/bagel/<repo name>`, fetched from Hugging Face first if any required file is missing there."""
    roots = comfy_bridge.model_roots()
    if not roots:
        raise RuntimeError("download_if_missing needs ComfyUI's model folders; run inside ComfyUI")
    folder = roots[0] / repo_id.rstrip("/").split("/")[-1]
    if all((folder / name).is_file() for name in REQUIRED_FILES):
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(
            "download_if_missing needs the huggingface_hub package (pip install huggingface_hub)"
        ) from None
    snapshot_download(repo_id=repo_id, local_dir=folder)
    return folder


class BAGELLoader:
    DESCRIPTION = (
        "Loads a BAGEL model (official BAGEL-7B-MoT layout) from models/bagel/, or the bundled tiny "
        "model, onto ComfyUI's device and under its memory management."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for every other BAGEL node.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": widget(
                    [bundled.DEFAULT_NAME, *local_models()],
                    "The bundled tiny model (runs anywhere in seconds), or a folder under models/bagel/ "
                    "holding ema.safetensors (e.g. BAGEL-7B-MoT from Hugging Face). Ignored while "
                    "download_if_missing is on.",
                    default=bundled.DEFAULT_NAME,
                ),
                "dtype": widget(
                    list(DTYPE_CHOICES),
                    "Weight precision. auto: bfloat16 on a GPU (the released weights), float32 on the CPU.",
                    default="auto",
                ),
                "attention": widget(
                    list(BACKENDS),
                    "Attention kernel. auto: flash-attn on a CUDA GPU in half precision when installed, "
                    "PyTorch SDPA otherwise. flash fails at load when it cannot run here.",
                    default="auto",
                ),
            },
            "optional": {
                "download_if_missing": widget(
                    "BOOLEAN",
                    "On: load repo_id from models/bagel/<repo name>, downloading it from Hugging Face first "
                    "if it is not complete there (BAGEL-7B-MoT is about 29 GB). Off: nothing is downloaded.",
                    default=False,
                ),
                "repo_id": widget(
                    "STRING", "Hugging Face repository to download when download_if_missing is on.",
                    default=OFFICIAL_REPO,
                ),
                "weights": widget(
                    list(WEIGHT_MODES),
                    "How the decoder's weights are stored. native: in dtype (BAGEL-7B-MoT: 29 GB in bf16). "
                    "fp8: float8 with per-row scales, computed in dtype (about 16 GB: fits 24 GB cards; "
                    "images move by about one level). nf4 / int8: bitsandbytes 4-bit / 8-bit layers (about "
                    "10 / 16 GB; needs pip install bitsandbytes).",
                    default="native",
                ),
            },
        }  # fmt: skip

    def load(
        self, model_name, dtype, attention, download_if_missing=False, repo_id=OFFICIAL_REPO, weights="native"
    ):
        folder = download(repo_id) if download_if_missing else find_model(model_name)
        compute, offload = comfy_bridge.devices()
        dtype = resolve_dtype(dtype, compute)
        model = bagel_model.load(folder, device=offload, dtype=dtype, attention=attention, weights=weights)
        return (comfy_bridge.manage(model, compute, offload),)
