"""BAGEL Loader: a model folder (official Hugging Face layout, or a fine-tune keeping it) or a single
`.safetensors` file (the ComfyUI repackage) to a BAGEL_MODEL.

Models are the bundled tiny one (always first, needs no file), then what `models/bagel/` holds: each
subfolder with BAGEL's files (`bagel_model.checkpoint.is_model_folder`) and each `.safetensors` file at its
top level except readable ones that are not BAGEL networks (a stray ae.safetensors), then the BAGEL
networks among the files of `models/diffusion_models/` (found by their position tables, other models are
left out). A single file has no autoencoder and no tokenizer: it takes FLUX's ae.safetensors from
`models/vae` (or the file picked in vae_name) and the Qwen2.5 tokenizer ComfyUI ships for its own Qwen
models (`comfy/text_encoders/qwen25_tokenizer`: BAGEL's vocabulary and marker ids).

Nothing is downloaded unless the user switches it on; then the
repo `owner/name` goes to `models/bagel/owner--name` (one folder per repo id, listed like any other model).

A download runs in a child process that this node waits for while watching ComfyUI's Cancel: a stalled
connection cannot block the queue (every request has a timeout) and Cancel stops it at once (the child is
killed; the files it had finished stay, and the next run fetches the rest).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .. import bagel_model
from ..bagel_model import bundled
from ..bagel_model.checkpoint import (
    AE_FILE,
    CONFIG_FILES,
    DTYPE_CHOICES,
    INDEX_SUFFIX,
    OFFICIAL_FILES,
    CheckpointError,
    find_weights,
    is_bagel_file,
    is_model_folder,
    read_header,
    read_index,
    resolve_dtype,
)
from ..bagel_model.layers.attention import BACKENDS
from ..bagel_model.quant import WEIGHT_MODES, quiet_int8_cast_warnings
from . import comfy_bridge
from .sockets import CATEGORY, MODEL, widget

OFFICIAL_REPO = "ByteDance-Seed/BAGEL-7B-MoT"
DIFFUSION_MODELS = "diffusion_models"
VAE_FOLDER = "vae"
AUTO = "auto"
# Seconds a download request may wait for the server (connect, headers, each chunk of data); the user's
# HF_HUB_ETAG_TIMEOUT (huggingface_hub's own knob) overrides it.
DOWNLOAD_TIMEOUT = 10
HUB = "https://huggingface.co"
_REPO_PART = r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")


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


# -- download ---------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """A download failed or could not start; the message says what to do instead."""


def repo_folder_name(repo_id: str) -> str:
    """The folder under models/bagel for a Hugging Face repo id: `owner--name` (the Hub forbids "--"
    inside a name, so two repo ids never share a folder)."""
    repo_id = repo_id.strip().strip("/")
    if not REPO_ID.fullmatch(repo_id):
        raise DownloadError(
            f"repo_id {repo_id!r} is not a Hugging Face repository id: write it as owner/name, e.g. "
            f"{OFFICIAL_REPO}"
        )
    return repo_id.replace("/", "--")


def broken_files(folder: Path) -> list[str]:
    """The files of `folder` that a load needs and that are missing or unreadable: the configs, the
    weights (`find_weights`: a file, or an index and its shards; "ema.safetensors" when there are none),
    ae.safetensors when it is there (a fine-tune may leave it to models/vae). A safetensors file is
    unreadable when truncated (its header promises more bytes than the file holds), a JSON file when cut
    short."""
    needed = list(CONFIG_FILES)
    try:
        weights = find_weights(folder)
    except CheckpointError:  # no weights at all (or several indexes): fetch the official file
        weights = folder / "ema.safetensors"
    needed.append(weights.name)
    if weights.name.endswith(INDEX_SUFFIX):
        with contextlib.suppress(CheckpointError):  # an unreadable index is listed already: fetched again
            needed += sorted(set(read_index(weights).values()))
    if (folder / AE_FILE).exists():
        needed.append(AE_FILE)
    broken = []
    for name in needed:
        path = folder / name
        if not path.is_file():
            broken.append(name)
            continue
        try:
            if name.endswith(".safetensors"):
                read_header(path)
            else:
                json.loads(path.read_text(encoding="utf-8"))
        except (CheckpointError, ValueError, OSError):
            broken.append(name)
    return broken


def download(repo_id: str, timeout: int | None = None) -> Path:
    """`models/bagel/<owner>--<name>`, after fetching the repo from Hugging Face if any required file is
    missing or damaged there (damaged files are deleted first, so they are fetched again)."""
    roots = comfy_bridge.model_roots()
    if not roots:
        raise DownloadError("download_if_missing needs ComfyUI's model folders; run inside ComfyUI")
    name = repo_folder_name(repo_id)
    repo_id = name.replace("--", "/")
    folder = roots[0] / name
    broken = broken_files(folder)
    if not broken:
        return folder
    for file in broken:
        (folder / file).unlink(missing_ok=True)
    fetch(repo_id, folder, _timeout(timeout))
    still = broken_files(folder)
    if still:
        raise DownloadError(
            f"{repo_id} was downloaded to {folder} but {', '.join(still)} is missing or unreadable there: it "
            "is not a BAGEL model folder (ByteDance-Seed/BAGEL-7B-MoT's layout, or a fine-tune's). Check "
            "repo_id."
        )
    return folder


def _timeout(timeout: int | None) -> int:
    if timeout is not None:
        return timeout
    value = os.environ.get("HF_HUB_ETAG_TIMEOUT", "")
    return int(value) if value.strip().isdigit() else DOWNLOAD_TIMEOUT


# Run by `fetch` in a child process: every file of the repo into the folder, each request with a timeout;
# on failure one line "BAGEL_FETCH_ERROR {kind, message}" on stdout, kind naming the exception and its
# causes (a timeout often arrives wrapped). Progress bars go to stderr: the console, as huggingface_hub
# draws them.
_FETCH = r"""
import json, sys
repo_id, folder, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    from huggingface_hub import HfApi, hf_hub_download
    info = HfApi().model_info(repo_id, timeout=timeout)
    for name in sorted(s.rfilename for s in info.siblings or ()):
        hf_hub_download(repo_id, name, revision=info.sha, local_dir=folder, etag_timeout=timeout)
except BaseException as e:
    kinds, cause = [], e
    while cause is not None and len(kinds) < 8:
        kinds.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    failure = {"kind": " <- ".join(kinds), "message": str(e)}
    print("\nBAGEL_FETCH_ERROR " + json.dumps(failure), flush=True)
    sys.exit(1)
"""
_POLL_SECONDS = 0.2


def fetch(repo_id: str, folder: Path, timeout: int) -> None:
    """Download `repo_id` into `folder` in a child process, honouring ComfyUI's Cancel while it runs.
    Raises DownloadError naming the cause and the way out."""
    if importlib.util.find_spec("huggingface_hub") is None:
        raise DownloadError(
            "download_if_missing needs the huggingface_hub package (pip install huggingface_hub), or turn "
            f"download_if_missing off and put the model folder in {folder} yourself"
        )
    # huggingface_hub reads these when the child imports it: metadata requests wait `timeout`, data
    # requests too unless the user set their own limit.
    env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": str(timeout)}
    env.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(timeout))
    command = [sys.executable, "-c", _FETCH, repo_id, str(folder), str(timeout)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
    try:
        while True:
            try:
                out, _ = child.communicate(timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                comfy_bridge.check_interrupt()
    finally:
        if child.poll() is None:  # cancelled (or any other exception): stop the download now
            child.kill()
            child.wait()
    if child.returncode == 0:
        return
    failure = {"kind": f"exit status {child.returncode}", "message": ""}
    for line in out.splitlines():
        if line.startswith("BAGEL_FETCH_ERROR "):
            failure = json.loads(line.split(" ", 1)[1])
    raise DownloadError(_explain(repo_id, folder, timeout, failure["kind"], failure["message"]))


def _explain(repo_id: str, folder: Path, timeout: int, kind: str, message: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or HUB
    offline = "OfflineMode" in kind or "outgoing traffic has been disabled" in message
    if offline:
        cause = "downloads are switched off in this environment (HF_HUB_OFFLINE is set)"
    elif "Timeout" in kind:
        cause = (
            f"{endpoint} did not answer within {timeout} s (on a slow network raise the limit with the "
            "environment variables HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT, in seconds)"
        )
    elif "Connect" in kind:
        cause = f"{endpoint} cannot be reached"
    elif "RepositoryNotFound" in kind or "GatedRepo" in kind:
        cause = "the repository does not exist or needs you to log in (HF_TOKEN) and accept its terms"
    else:
        cause = f"{kind}: {message.strip()[:500]}"
    return (
        f"Downloading {repo_id} failed: {cause}. Queue again once this is fixed (finished files are kept), "
        f"or turn download_if_missing off and put the model folder in {folder} yourself (official layout: "
        f"{', '.join(OFFICIAL_FILES)}, tokenizer files), then pick {folder.name} in model_name."
    )


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
