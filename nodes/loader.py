"""BAGEL Loader: a model folder (official Hugging Face layout, or a fine-tune keeping it) or a single
`.safetensors` file (the ComfyUI repackage) to a BAGEL_MODEL.

Models are the bundled tiny one (always first, needs no file), then what `models/bagel/` holds: each
subfolder with BAGEL's files (`bagel_model.layout.is_model_folder`) and each `.safetensors` file at its
top level except readable ones that are not BAGEL networks (a stray ae.safetensors), then the BAGEL
networks among the files of `models/diffusion_models/` (found by their position tables, other models are
left out). A single file has no autoencoder and no tokenizer: it takes FLUX's ae.safetensors from
`models/vae` (or the file picked in vae_name) and the Qwen2.5 tokenizer ComfyUI ships for its own Qwen
models (`comfy/text_encoders/qwen25_tokenizer`: BAGEL's vocabulary and marker ids).

Nothing is downloaded unless the user switches it on; then `hub.download` fetches the repo into
`models/bagel/owner--name` first.
"""

from __future__ import annotations

from pathlib import Path

from .. import bagel_model
from ..bagel_model import bundled
from ..bagel_model.checkpoint import DTYPE_CHOICES, resolve_dtype
from ..bagel_model.layers.attention import BACKENDS
from ..bagel_model.layout import AE_FILE, CheckpointError, is_bagel_file, is_model_folder, read_header
from ..bagel_model.quant import WEIGHT_MODES, quiet_int8_cast_warnings
from . import comfy_bridge
from .hub import DOWNLOAD_TIMEOUT, OFFICIAL_REPO, download
from .sockets import CATEGORY, MODEL, widget

DIFFUSION_MODELS = "diffusion_models"
VAE_FOLDER = "vae"
AUTO = "auto"


def _is_bagel_file(path: Path, unreadable: bool) -> bool:
    """Whether to list `path` as a single-file model; `unreadable`: what to say when it cannot be read."""
    try:
        return is_bagel_file(path)
    except CheckpointError:
        return unreadable


def local_models() -> dict[str, Path]:
    """Name -> folder or file of each model (module docstring); the first one found wins a name. A file
    in models/bagel that cannot be read is listed, so that loading it says why; one in diffusion_models
    is not (that folder holds every other kind of model too)."""
    found: dict[str, Path] = {}
    for root in comfy_bridge.model_roots():
        if root.is_dir():
            for entry in sorted(root.iterdir()):
                if entry.is_dir() and is_model_folder(entry):
                    found.setdefault(entry.name, entry)
                elif entry.is_file() and entry.suffix == ".safetensors" and _is_bagel_file(entry, True):
                    found.setdefault(entry.name, entry)
    for name, path in comfy_bridge.model_files(DIFFUSION_MODELS).items():
        if path.suffix == ".safetensors" and _is_bagel_file(path, False):
            found.setdefault(name, path)
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
            "files; or a fine-tune's), or a single-file BAGEL .safetensors there or in "
            "models/diffusion_models, or switch on download_if_missing."
        )
    return models[name]


def vae_file(model: Path, vae_name: str) -> Path | None:
    """The autoencoder to load `model` with: the file picked in vae_name; for "auto" the model folder's
    own (None), else models/vae/ae.safetensors (FLUX's, which BAGEL uses)."""
    vaes = comfy_bridge.model_files(VAE_FOLDER)
    if vae_name != AUTO:
        if vae_name not in vaes:
            raise FileNotFoundError(
                f"vae_name {vae_name!r} is not in ComfyUI's models/vae folders; pick another"
            )
        return vaes[vae_name]
    if model.is_dir() and (model / AE_FILE).is_file():
        return None
    if AE_FILE not in vaes:
        raise FileNotFoundError(
            f"{model} holds no autoencoder and ComfyUI's models/vae has no {AE_FILE}: put FLUX's autoencoder "
            f"{AE_FILE} (black-forest-labs/FLUX.1-schnell, or the BAGEL-7B-MoT download's) in models/vae, or "
            "pick a file in vae_name"
        )
    return vaes[AE_FILE]


def tokenizer_folder(model: Path) -> Path | None:
    """The tokenizer for `model`: a folder's own (None), for a single file ComfyUI's Qwen2.5 tokenizer."""
    if model.is_dir():
        return None
    folder = comfy_bridge.qwen25_tokenizer()
    if folder is None:
        raise FileNotFoundError(
            f"{model} is a single file, which holds no tokenizer, and this ComfyUI has no "
            "comfy/text_encoders/qwen25_tokenizer (ComfyUI ships it since its Qwen-Image support): update "
            "ComfyUI, or load the model as a folder (ByteDance-Seed/BAGEL-7B-MoT's layout) instead"
        )
    return folder


class BAGELLoader:
    DESCRIPTION = (
        "Loads a BAGEL model (a BAGEL-7B-MoT-layout folder or fine-tune, or a single .safetensors file) "
        "from models/bagel/ or models/diffusion_models/, or the bundled tiny model, onto ComfyUI's device "
        "and under its memory management."
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
                    "The bundled tiny model (runs anywhere in seconds), a folder under models/bagel/ (e.g. "
                    "ByteDance-Seed--BAGEL-7B-MoT from Hugging Face, or a fine-tune in that layout), or a "
                    "single-file BAGEL .safetensors from models/bagel/ or models/diffusion_models/. "
                    "Ignored while download_if_missing is on.",
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
                    "On: load repo_id from models/bagel/<owner>--<name> (e.g. ByteDance-Seed--BAGEL-7B-MoT), "
                    "downloading from Hugging Face first any file that is missing or damaged there "
                    "(BAGEL-7B-MoT is about 29 GB; Cancel stops the download, a server silent for "
                    f"{DOWNLOAD_TIMEOUT} s fails it; HF_HUB_ETAG_TIMEOUT changes that). Off: nothing is "
                    "downloaded.",
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
                    "10 / 16 GB; needs pip install bitsandbytes). Only native weights stream by ComfyUI's "
                    "dynamic VRAM or load partly; the others always load whole.",
                    default="native",
                ),
                "vae_name": widget(
                    [AUTO, *comfy_bridge.model_files(VAE_FOLDER)],
                    "The autoencoder, from models/vae. auto: the model folder's ae.safetensors; for a "
                    "single file (or a folder without one) models/vae/ae.safetensors, FLUX's autoencoder.",
                    default=AUTO,
                ),
            },
        }  # fmt: skip

    def load(
        self,
        model_name,
        dtype,
        attention,
        download_if_missing=False,
        repo_id=OFFICIAL_REPO,
        weights="native",
        vae_name=AUTO,
    ):
        path = download(repo_id) if download_if_missing else find_model(model_name)
        if path.is_file():
            read_header(path)  # a cut or foreign file is named as such, before its missing parts are
        vae, tokenizer = vae_file(path, vae_name), tokenizer_folder(path)
        compute, offload = comfy_bridge.devices()
        dtype = resolve_dtype(dtype, compute)
        if weights == "int8":
            quiet_int8_cast_warnings()  # logging is the application's: ComfyUI's is this node
        options = dict(device=offload, dtype=dtype, attention=attention, weights=weights)
        options["ops"] = comfy_bridge.layer_ops()
        model = bagel_model.load(path, vae=vae, tokenizer=tokenizer, **options)
        return (comfy_bridge.manage(model, compute, offload),)
