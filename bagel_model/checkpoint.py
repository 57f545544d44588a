"""Load a BAGEL checkpoint into the model, strictly; write the official layout.

Which files a folder or single file is, and the configuration they describe, is `layout.py`'s (its
docstring lists every layout read); this module builds the modules on the `meta` device, checks every
tensor name and shape against the file headers before reading any data, then streams tensors one at a
time into place (converted to the target dtype on the way), so a bf16 checkpoint never exists as an fp32
copy in RAM. Adapters are merged and the model placed inside the one `load`, in that order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from . import lora
from .config import BagelConfig
from .layers.attention import check_backend
from .layers.ops import TORCH, Ops
from .layers.vae import AutoEncoder
from .layout import FOLDER_HINT, Checkpoint, CheckpointError, Weights, ae_file, read_checkpoint, read_weights
from .model import Bagel, BagelModel
from .offload import dispatch
from .quant import BNB_MODES, WEIGHT_MODES, bitsandbytes, quantize_linears
from .tokenizer import MARKERS, BagelTokenizer


def tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a torch.nn-built module holds (what its checkpoint must hold)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def checkpoint_shapes(cfg: BagelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The tensors of the network's and of the autoencoder's checkpoint, from the layer definitions
    (built on meta with torch.nn layers). Not from the modules being loaded: a host's layers may hold no
    weight until they are loaded (ComfyUI's under dynamic VRAM), and quantized ones hold other tensors."""
    with torch.device("meta"), _NoInitOnMeta():
        return tensor_shapes(Bagel(cfg)), tensor_shapes(AutoEncoder(cfg.vae))


def check_keys(
    path: Path,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    hint: str = FOLDER_HINT,
) -> None:
    """Raise one error listing the first missing, unexpected and mis-shaped tensors; `hint` says where
    the configs that shaped the module came from, i.e. what to check."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [k for k in expected if k in found and found[k] != expected[k]]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        shown = ", ".join(f"{k} {list(expected[k])}" for k in missing[:5])
        parts.append(f"{len(missing)} missing tensor(s), first: {shown}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s), first: {', '.join(unexpected[:5])}")
    if misshaped:
        shown = "; ".join(f"{k} is {list(found[k])}, expected {list(expected[k])}" for k in misshaped[:5])
        parts.append(f"{len(misshaped)} tensor(s) with the wrong shape: {shown}")
    raise CheckpointError(
        f"{path} does not match the model its config files describe: " + "; ".join(parts) + ". " + hint
    )


def _load_layer(root: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Hand one layer all of its tensors through PyTorch's own loading hook, assigning them (no copy into
    the meta-built parameters): layers that load in their own way (ComfyUI's `comfy.ops`, which may have
    no weight before this; quantized layers, which convert on the way) get them as they expect."""
    layer = root.get_submodule(name)
    missing: list[str] = []
    unexpected: list[str] = []
    errors: list[str] = []
    prefix = f"{name}." if name else ""
    metadata = {"assign_to_params_buffers": True}
    layer._load_from_state_dict(tensors, prefix, metadata, True, missing, unexpected, errors)
    problems = [*errors]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{path}: layer {name or '(root)'} ({type(layer).__name__}) did not take its tensors: "
            f"{'; '.join(problems)}"
        )


def fill(
    module: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    path: Path,
) -> None:
    """Load a meta-built `module` from `tensors` (name, tensor), one layer at a time as soon as all of its
    tensors (`shapes`, checked beforehand) have arrived, so only a layer's worth is ever held apart from
    the module. Afterwards every parameter and buffer must be real: a layer that kept a meta tensor did
    not load."""
    owned: dict[str, int] = {}
    for key in shapes:
        owner = key.rpartition(".")[0]
        owned[owner] = owned.get(owner, 0) + 1
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors:
        owner = key.rpartition(".")[0]
        arrived = pending.setdefault(owner, {})
        arrived[key] = tensor
        if len(arrived) == owned[owner]:
            _load_layer(module, owner, pending.pop(owner), path)
    unloaded = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if pending or unloaded:
        left = [*pending, *unloaded]
        raise CheckpointError(f"{path}: {len(left)} tensor(s) were not loaded, first: {', '.join(left[:5])}")
    module.requires_grad_(False)


def stream_weights(
    module: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    weights: Weights,
    device: torch.device,
    dtype: torch.dtype,
    weight_mode: str = "native",
    hint: str = FOLDER_HINT,
) -> None:
    """Check `weights` against `shapes` (`checkpoint_shapes`), then fill the meta-built `module` tensor by
    tensor, file by file, each converted to `dtype` on `device` right after it is read (in a quantized
    mode the target layers' weights go to them as read: they quantize on the device). `hint` goes into
    the error when the tensors do not fit (see `check_keys`)."""
    check_keys(weights.path, shapes, weights.header, hint)
    quantized = set() if weight_mode == "native" else quantize_linears(module, weight_mode, dtype)

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for path, keys in weights.shards.items():
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    tensor = f.get_tensor(key).to(device=device)
                    yield key, tensor if key in quantized else tensor.to(dtype=dtype)

    fill(module, shapes, read(), weights.path)


_INITIALIZERS = frozenset(
    {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
     "xavier_normal_", "zero_", "zeros_", "ones_", "fill_", "constant_"}
)  # fmt: skip


class _NoInitOnMeta(TorchFunctionMode):
    """While building on meta, weight initializers do nothing: the weights are read next. Run on meta
    they are pointless, and torch routes them through `torch._refs`, whose first use imports
    `torch._dynamo` and sympy: 1.5-2 s of every load, more than reading a small checkpoint."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INITIALIZERS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes it as a keyword
            if getattr(target, "is_meta", False):
                return target
        return func(*args, **kwargs)


# The weight dtypes a user can name (CLI --dtype, the Loader's dtype widget), besides "auto".
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the released weights' dtype), fp32 on CPU (where bf16 matmuls are slow or missing)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype choice (one of DTYPE_CHOICES) as a torch dtype; "auto" is `default_dtype` of `device`."""
    if name == "auto":
        return default_dtype(torch.device(device))
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is unknown; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def _tokenizer(ckpt: Checkpoint, folder: Path | str | None, cfg: BagelConfig) -> BagelTokenizer:
    """The tokenizer from `folder` when given, else the model folder's, checked against the embedding
    and against the marker ids a single file's metadata records."""
    if folder is None and not ckpt.source.is_dir():
        raise CheckpointError(
            f"{ckpt.source} is a single-file checkpoint without a tokenizer: give a folder holding "
            "BAGEL's Qwen2.5 tokenizer (tokenizer.json, or vocab.json + merges.txt: the "
            "ByteDance-Seed/BAGEL-7B-MoT folder, or ComfyUI's comfy/text_encoders/qwen25_tokenizer) as "
            "tokenizer (--tokenizer on the command line)"
        )
    folder = Path(folder or ckpt.source)
    tokenizer = BagelTokenizer(folder)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the embedding of {ckpt.weights.path} "
            f"only {cfg.llm.vocab_size} rows; the tokenizer files belong to another model"
        )
    ids = dict(zip(MARKERS, dataclasses.astuple(tokenizer.markers), strict=True))
    for marker, expected in ckpt.special_token_ids.items():
        if marker in ids and ids[marker] != expected:
            raise CheckpointError(
                f"the tokenizer in {folder} gives {marker} the id {ids[marker]}, but {ckpt.metadata_source} "
                f"records {expected}: the tokenizer belongs to another model; give the one it was made with"
            )
    return tokenizer


def load(
    path: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
    attention: str = "auto",
    weights: str = "native",
    vae: Path | str | None = None,
    tokenizer: Path | str | None = None,
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str] | None = None,
    offload_folder: Path | str | None = None,
    ops: Ops = TORCH,
    loras: Sequence[tuple[Path | str, float]] = (),
) -> BagelModel:
    """Load a BAGEL model folder or single file (layouts: module docstring). Strict: any missing, extra
    or mis-shaped tensor is an error.

    `attention` picks the attention backend (`layers.attention.BACKENDS`); `weights` how the decoder's
    linear weights are stored (`quant.WEIGHT_MODES`: "native" in `dtype`, or "fp8" / "nf4" / "int8" with
    compute in `dtype`). `vae` is the autoencoder's file and `tokenizer` a folder with tokenizer files:
    a single file needs both, a folder uses its own unless they are given. `device_map`, `max_memory`
    and `offload_folder` spread the decoder over devices or offload it to the CPU and disk in accelerate's
    vocabulary (`offload.dispatch`; the map is "auto" when only a budget is given); the weights stream to
    the CPU first, then into place. `ops` are the layer classes to build with (`layers.ops`; a host's own,
    e.g. ComfyUI's). `loras` are (PEFT adapter, strength) pairs merged in order into the native weights
    before the model is placed (a merge after accelerate placed it would miss offloaded layers). Unusable
    choices and unreadable adapters are refused here, before any weight is read."""
    check_backend(attention)
    if weights not in WEIGHT_MODES:
        raise CheckpointError(f"weight mode {weights!r} is unknown; choose one of {', '.join(WEIGHT_MODES)}")
    if weights in BNB_MODES:
        bitsandbytes()  # a missing package is reported before any weight is read
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if max_memory is not None and device_map is None:
        device_map = "auto"
    if device_map is not None and weights != "native":
        raise CheckpointError(f"weights {weights!r} cannot be combined with a device map; use weights native")
    adapters = [(lora.read(adapter), strength) for adapter, strength in loras]
    ckpt, cfg = read_checkpoint(Path(path))
    ae = read_weights(ae_file(ckpt, vae))
    bpe = _tokenizer(ckpt, tokenizer, cfg)
    net_shapes, ae_shapes = checkpoint_shapes(cfg)
    with torch.device("meta"), _NoInitOnMeta():
        net, autoencoder = Bagel(cfg, ops), AutoEncoder(cfg.vae, ops)
    place = torch.device("cpu") if device_map else device
    stream_weights(net, net_shapes, ckpt.weights, place, dtype, weights, ckpt.hint)
    for adapter, strength in adapters:
        lora.check(net, adapter, strength)
        lora.merge(net, adapter, strength)
    if device_map is not None:
        device = dispatch(net, device_map, max_memory, offload_folder)
    ae_hint = ckpt.hint if vae is None else f"{ae.path} must be FLUX's autoencoder (ae.safetensors)."
    stream_weights(autoencoder, ae_shapes, ae, device, vae_dtype, hint=ae_hint)
    net.attn_backend = attention
    return BagelModel(net=net.eval(), vae=autoencoder.eval(), tokenizer=bpe, config=cfg, source=ckpt.source)


def save(model: Bagel, vae: AutoEncoder, cfg: BagelConfig, folder: Path | str) -> None:
    """Write the weights and configs in the official layout (the tokenizer is written by its maker)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llm = {f: getattr(cfg.llm, f) for f in cfg.llm.__dataclass_fields__}
    llm.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False)
    (folder / "llm_config.json").write_text(json.dumps(llm, indent=2))
    (folder / "vit_config.json").write_text(json.dumps(cfg.vit.to_json_dict(), indent=2))
    cfg.vae.to_json(folder / "ae_config.json")
    (folder / "bagel_inference.json").write_text(json.dumps(cfg.inference.to_json_dict(), indent=2))
    for module, name in ((model, "ema.safetensors"), (vae, "ae.safetensors")):
        tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
