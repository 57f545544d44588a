"""The one seam between the nodes and ComfyUI.

Everything ComfyUI-specific the nodes use goes through here: the `models/bagel` folder, the compute and
offload devices, the memory manager (a `ModelPatcher`, so ComfyUI can offload BAGEL when other models need
room, and its "Unload models" / `POST /free` reach it), progress bars, live text and interrupts. Each
ComfyUI module is imported lazily and every function has a plain fallback, so the nodes import, run and test
without ComfyUI (CI has none).

This module knows no BAGEL task and no ComfyUI type conversion: it carries a loaded model (and the LoRA
patches ComfyUI applies to it) and reports progress, nothing else.
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..bagel_model import BagelModel, lora
from ..bagel_model.layers.ops import TORCH, Ops, RMSNorm, rms_norm
from ..bagel_model.quant import is_quantized

MODEL_FOLDER = "bagel"


def _comfy(name: str) -> ModuleType | None:
    """ComfyUI's module `name` (e.g. "comfy.utils", "folder_paths"), or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# -- model files ------------------------------------------------------------------------------------


def register_model_folder() -> None:
    """Add `<models>/bagel` to ComfyUI's folders, after any the user set in extra_model_paths.yaml."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def model_roots() -> list[Path]:
    """Folders whose subfolders are BAGEL models, in ComfyUI's order; none outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return []
    return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]


def model_files(folder_name: str) -> dict[str, Path]:
    """Every file in ComfyUI's `folder_name` model folders ("vae", "diffusion_models", ...): its name as
    ComfyUI lists it (a relative path) -> where it is; none outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return {}
    found = {
        name: folder_paths.get_full_path(folder_name, name)
        for name in folder_paths.get_filename_list(folder_name)
    }
    return {name: Path(path) for name, path in found.items() if path is not None}


def save_folder(folder_name: str) -> Path | None:
    """Where ComfyUI saves new files of its `folder_name` models ("loras": the first of its folders, the
    one its own LoRA trainer writes to); None outside ComfyUI."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is None:
        return None
    return Path(folder_paths.get_folder_paths(folder_name)[0])


def qwen25_tokenizer() -> Path | None:
    """The Qwen2.5 tokenizer ComfyUI ships for its own Qwen models (`comfy/text_encoders/qwen25_tokenizer`:
    vocab.json, merges.txt, tokenizer_config.json; BAGEL's vocabulary and marker ids), for single-file
    BAGEL models, which hold no tokenizer; None outside ComfyUI or in one without it."""
    comfy = _comfy("comfy")
    for root in getattr(comfy, "__path__", ()):  # a namespace package: no __init__.py, maybe several roots
        folder = Path(root, "text_encoders", "qwen25_tokenizer")
        if folder.is_dir():
            return folder
    return None


# -- devices and memory -----------------------------------------------------------------------------


def devices() -> tuple[torch.device, torch.device]:
    """(compute device, offload device) as ComfyUI chose them (honouring --cpu, --highvram, ...);
    outside ComfyUI, CUDA when available for both."""
    mm = _comfy("comfy.model_management")
    if mm is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return device, device
    return mm.get_torch_device(), mm.unet_offload_device()


@dataclass(frozen=True, eq=False, repr=False)
class ManagedModel:
    """What flows on a BAGEL_MODEL socket: the loaded model plus, inside ComfyUI, the ModelPatcher that
    puts it under ComfyUI's memory management. Contexts check the model's identity, so one loader output
    (or one LoRA node's output: a different model) must feed a whole chain."""

    model: BagelModel
    patcher: object | None = None

    def __repr__(self) -> str:
        return f"Managed{self.model!r}"

    def ready(self) -> BagelModel:
        """The model, ready to run on the compute device: ComfyUI may have offloaded it since the last
        node ran. Built from ComfyUI's weight-casting layers (`layer_ops`) with native weights, it may be
        loaded partly (the rest is brought in layer by layer); quantized weights are loaded fully, since
        their layers cannot cast."""
        if self.patcher is not None:
            # A dynamic patcher streams weights and refuses a full load; quantized ones cannot cast.
            full = is_quantized(self.model) and not is_dynamic(self.patcher)
            _comfy("comfy.model_management").load_models_gpu([self.patcher], force_full_load=full)
            # Contexts keep their K/V where ComfyUI offloads models (host RAM), visible to its caches.
            self.model.place(self.patcher.load_device, kv_storage=self.patcher.offload_device)
        return self.model


@torch.inference_mode(False)
def make_trainable(model: BagelModel) -> None:
    """Replace the model's inference tensors by ordinary copies, one tensor at a time (no second model in
    memory), so autograd may save them for a backward pass.

    ComfyUI runs every node under `torch.inference_mode()`, so the tensors a node loads or moves there are
    inference tensors, which a backward pass refuses to keep ("Inference tensors cannot be saved for
    backward"); the base weights of a LoRA are such tensors in each adapted layer's product. The copies
    hold the same values, so every later task gives the same result."""
    for module in model.net.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_inference():
                setattr(module, name, torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_inference():
                module.register_buffer(
                    name, buffer.clone(), persistent=name not in module._non_persistent_buffers_set
                )


def is_dynamic(patcher: object) -> bool:
    """Whether ComfyUI streams this patcher's weights by dynamic VRAM (the newest ComfyUI on NVIDIA);
    v0.3.64's patchers do not say, and never do."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def layer_ops() -> Ops:
    """The layer classes to build BAGEL from: inside ComfyUI, its `comfy.ops` layers, which cast their
    weights to the input's device when ComfyUI's memory manager loads the model partly (and run as plain
    torch layers otherwise); torch.nn outside ComfyUI."""
    ops = _comfy("comfy.ops")
    if ops is None:
        return TORCH
    layers = ops.disable_weight_init
    # Newer ComfyUI casts into a reusable (offload-stream) buffer and wants it handed back after use;
    # v0.3.64's cast_bias_weight has no such argument.
    offloadable = "offloadable" in inspect.signature(ops.cast_bias_weight).parameters

    class CastRMSNorm(RMSNorm, ops.CastWeightBiasOp):
        """BAGEL's Qwen2 RMSNorm, its weight brought to the input by ComfyUI when it is left elsewhere
        (partial loading; dynamic VRAM streams every layer that way)."""

        bias = None  # ComfyUI's cast reads one

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not (self.comfy_cast_weights or self.weight_function or self.bias_function):
                return rms_norm(x, self.weight, self.eps)
            if not offloadable:
                return rms_norm(x, ops.cast_bias_weight(self, x)[0], self.eps)
            weight, bias, stream = ops.cast_bias_weight(self, x, offloadable=True)
            out = rms_norm(x, weight, self.eps)
            ops.uncast_bias_weight(self, weight, bias, stream)
            return out

    return Ops(
        Linear=layers.Linear,
        Embedding=layers.Embedding,
        LayerNorm=layers.LayerNorm,
        Conv2d=layers.Conv2d,
        GroupNorm=layers.GroupNorm,
        RMSNorm=CastRMSNorm,
    )


def manage(model: BagelModel, compute: torch.device, offload: torch.device) -> ManagedModel:
    """Hand `model` (loaded on `offload`) to ComfyUI's memory manager; a plain wrapper outside ComfyUI.

    Native weights get ComfyUI's core patcher (`CoreModelPatcher`: the dynamic-VRAM patcher where the
    newest ComfyUI switched it on, else its ModelPatcher), with the weights' dtypes recorded as its own
    loaders record them (`archive_model_dtypes`). Quantized weights (fp8 / nf4 / int8) stay on the legacy
    ModelPatcher: their layers store weights in formats the dynamic patcher cannot stream."""
    model_patcher = _comfy("comfy.model_patcher")
    if model_patcher is None:
        return ManagedModel(model)
    legacy = model_patcher.ModelPatcher
    patcher_class = legacy if is_quantized(model) else getattr(model_patcher, "CoreModelPatcher", legacy)
    archive = getattr(_comfy("comfy.model_management"), "archive_model_dtypes", None)
    if archive is not None:
        archive(model)
    return ManagedModel(model, patcher_class(model, compute, offload))


def with_lora(managed: ManagedModel, adapter: lora.Adapter, strength: float) -> ManagedModel:
    """A new model: `managed` with `adapter` at `strength`. `managed` is left as it is.

    Inside ComfyUI the adapter becomes weight patches on a clone of the patcher, in ComfyUI's own LoRA
    format (`comfy.lora.load_lora`), as its LoraLoader does: ComfyUI merges them into the shared weights when
    it loads this clone and restores the weights when it loads another clone (the base model, another LoRA),
    so the base ManagedModel still gives the base model and LoRA nodes stack. The clone holds the same
    BagelModel as the base; the library gets a BagelModel of its own around the same modules, so a context
    is tied to the weights that built it (base contexts are refused here, and the other way round).
    Outside ComfyUI the library merges the adapter into a copy of the weights it changes."""
    if managed.patcher is None:
        return ManagedModel(lora.apply(managed.model, adapter, strength))
    lora.check(managed.model.net, adapter, strength)  # before patching: ComfyUI skips keys it cannot patch
    tensors, targets = {}, {}
    for key, low in adapter.weights.items():
        name = key.removesuffix(".weight")
        tensors[f"{name}.lora_up.weight"] = low.up
        tensors[f"{name}.lora_down.weight"] = low.down
        tensors[f"{name}.alpha"] = torch.tensor(low.scale * low.rank)  # ComfyUI scales by alpha / rank
        targets[name] = f"net.{key}"  # the weight's key in BagelModel's state dict, which the patcher holds
    patches = _comfy("comfy.lora").load_lora(tensors, targets)
    patcher = managed.patcher.clone()
    added = patcher.add_patches(patches, strength)
    if len(added) != len(targets):
        raise RuntimeError(
            f"ComfyUI took {len(added)} of the {len(targets)} weight patches of {adapter.path}"
        )
    base = managed.model
    return ManagedModel(BagelModel(base.net, base.vae, base.tokenizer, base.config, base.source), patcher)


# -- progress ---------------------------------------------------------------------------------------


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user cancelled the run (Cancel, `POST /interrupt`);
    nothing outside ComfyUI. For work that is not a library task (a download): call it while waiting."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """The library's `callback(step, total, payload)` as ComfyUI progress.

    Each call is one decoded token or one denoising step. It checks ComfyUI's interrupt flag first (so
    "Cancel" stops a run within one step or token: the exception propagates out of the library task,
    which leaves every context untouched), then advances the node's progress bar. `runs` joins several
    loops of one length (one per frame, one per edited latent) into one bar; `runs=None` is for a number
    of loops of different lengths known only as they come (a reasoning loop's text segments and images):
    the bar then shows the current loop, starting again at each.

    With `preview` (see `previewer`), each denoising step also sends ComfyUI a preview of its estimate."""

    def __init__(self, runs: int | None = 1, preview: Callable[[torch.Tensor], tuple | None] | None = None):
        self._runs = runs
        self._preview = preview
        self._done = 0
        self._bar = None
        self._utils = _comfy("comfy.utils")
        mm = _comfy("comfy.model_management")
        self._check_interrupt = mm.throw_exception_if_processing_interrupted if mm else None

    def __call__(self, step: int, total: int, payload: object) -> None:
        if self._check_interrupt is not None:
            self._check_interrupt()
        self._done += 1
        if self._utils is None:
            return
        image = None
        if self._preview is not None and isinstance(payload, torch.Tensor):
            image = self._preview(payload)
        if self._runs is None:
            if self._bar is None:
                self._bar = self._utils.ProgressBar(total)
            self._bar.update_absolute(step, total, image)
            return
        if self._bar is None:
            self._bar = self._utils.ProgressBar(total * self._runs)
        self._bar.update_absolute(self._done, None, image)


OWN_DECODE_PREVIEW_PIXELS = 256 * 256  # larger images from a non-FLUX autoencoder get no preview


def previewer(model: BagelModel) -> Callable[[torch.Tensor], tuple | None] | None:
    """Step previews as ComfyUI's samplers send them, honouring its --preview-method; None when off or
    outside ComfyUI. The payload is a step's clean-latent estimate in the model's scaled space, which for
    the official autoencoder is FLUX's latent space: ComfyUI's own FLUX previewer (latent-to-RGB
    factors, or TAESD where installed) reads it at no cost. Another autoencoder (the bundled model's) has
    no factors, so small images are decoded through it instead, and large ones get no preview."""
    preview, formats, cli = _comfy("latent_preview"), _comfy("comfy.latent_formats"), _comfy("comfy.cli_args")
    if preview is None or formats is None or cli is None:
        return None
    if cli.args.preview_method == cli.LatentPreviewMethod.NoPreviews:
        return None
    flux, vae = formats.Flux(), model.config.vae
    if (vae.z_channels, vae.scale_factor, vae.shift_factor) == (16, flux.scale_factor, flux.shift_factor):
        decoder = preview.get_previewer(model.device, flux)
        if decoder is None:
            return None
        return lambda z: decoder.decode_latent_to_preview_image("JPEG", (z if z.ndim == 4 else z[None])[:1])

    def own(z: torch.Tensor) -> tuple | None:
        first = z if z.ndim == 3 else z[0]
        if first.shape[1] * first.shape[2] * 64 > OWN_DECODE_PREVIEW_PIXELS:
            return None
        return "JPEG", model.decode_latent(first), cli.args.preview_size

    return own


# -- outputs ----------------------------------------------------------------------------------------


def no_output() -> object:
    """What a node returns on an output that has nothing this run: ComfyUI's silent `ExecutionBlocker`, so
    the nodes fed by that output are skipped without an error (and the node's other outputs still flow);
    None outside ComfyUI."""
    graph_utils = _comfy("comfy_execution.graph_utils")
    return None if graph_utils is None else graph_utils.ExecutionBlocker(None)


# -- live text --------------------------------------------------------------------------------------


class LiveText:
    """Text as it is decoded, shown on node `node_id` while it grows, as ComfyUI's progress text
    (`PromptServer.send_progress_text`: a binary websocket message to the client that queued the prompt).

    A library callback: each call goes to `callback` first (progress, interrupts), and a `str` payload (the
    text so far) is sent on. Not every token is sent: a message goes out for the first text, then once
    `every` more tokens came or `interval` seconds passed since the last message, whichever comes first, so
    text shows within a few tokens and a tenth of a second, and a fast model sends a message per few
    tokens, not one per token. A text held back is sent when a denoising step comes instead (no more text
    comes while a picture is drawn: Reason's `[drawing image k]` shows then), and `finish` always sends the
    final text. Without a node id or outside ComfyUI nothing is sent."""

    def __init__(
        self,
        node_id: str | None,
        callback: Callable[[int, int, object], None],
        every: int = 4,
        interval: float = 0.1,
    ):
        self._node_id = node_id
        self._callback = callback
        self._every = every
        self._interval = interval
        self._waiting = 0  # texts held back since the last message
        self._held: str | None = None  # the latest of them
        self._sent_at: float | None = None
        server = _comfy("server") if node_id is not None else None
        self._server = getattr(getattr(server, "PromptServer", None), "instance", None)

    def __call__(self, step: int, total: int, payload: object) -> None:
        self._callback(step, total, payload)
        if isinstance(payload, str):
            self.update(payload)
        elif self._held is not None:
            self._send(self._held, time.monotonic())

    def update(self, text: str) -> None:
        """The text so far: sent when it is due, else held back."""
        self._waiting, self._held = self._waiting + 1, text
        now = time.monotonic()
        if self._sent_at is None or self._waiting >= self._every or now - self._sent_at >= self._interval:
            self._send(text, now)

    def finish(self, text: str) -> None:
        """The final text: always sent, so the node ends showing all of it."""
        self._send(text, time.monotonic())

    def _send(self, text: str, now: float) -> None:
        self._waiting, self._held, self._sent_at = 0, None, now
        if self._server is not None:
            self._server.send_progress_text(text, self._node_id, self._server.client_id)
