"""Read BAGEL checkpoints in every layout they are published in, strictly; write the official one.

Model folders (ByteDance-Seed/BAGEL-7B-MoT's layout, and the fine-tunes that keep it): `llm_config.json`,
`vit_config.json`, the network's weights, `ae.safetensors` (the FLUX autoencoder), tokenizer files; optional
files of ours: `ae_config.json` (a smaller AE) and `bagel_inference.json` (image limits, default size).
Nothing else is read: several fine-tunes ship a `config.json` that is not valid JSON. The weights are the
first of these that exists (`find_weights`):
  1. `ema.safetensors`, `model.safetensors`, `model_bf16.safetensors`, in that order: official training
     writes both model (raw) and ema (averaged) weights and the official inference reads ema; fine-tunes
     publish model or model_bf16. Each may instead be sharded: `<name>.safetensors.index.json` plus the
     shards its weight_map names; one file wins over its own index, as in transformers.
  2. else the folder's only `*.safetensors.index.json` (several are an error: which one is meant?).

Single files (the ComfyUI repackage of the peer pack neverbiasu/ComfyUI-BAGEL, e.g. 6chan/bagel_comfy): one
`.safetensors` holding the tensors of `ema.safetensors`, no autoencoder and no tokenizer (`load` is given
both). Its configs come from the first of:
  1. its safetensors metadata entry `comfyui_bagel` (METADATA_KEY): a JSON string of an object with
     "format": "comfyui_bagel", "format_version": 1 and "model_configs": {"llm_config.json": {...},
     "vit_config.json": {...}}, the folder files' contents (we also read "ae_config.json" and
     "bagel_inference.json" there); "special_token_ids" (marker -> id), when present, must match the
     tokenizer's; "quantization" other than "none" is refused;
  2. a sidecar `<file>.comfyui-bagel.json` (SIDECAR_SUFFIX): {"format": "comfyui_bagel_sidecar",
     "format_version": 1, "checkpoint_size": <bytes of the file>, "metadata": <the object above>}; the
     size must match (its SHA-256 is not checked: hashing 29 GB on every load);
  3. else BAGEL-7B-MoT's configs (config.BAGEL_7B_MOT); a missing model_configs entry falls back the same way.

Loading builds the modules on the `meta` device, checks every tensor name and shape against the file
headers before reading any data, then streams tensors one at a time into place (converted to the target
dtype on the way), so a bf16 checkpoint never exists as an fp32 copy in RAM.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from . import lora
from .config import (
    BAGEL_7B_MOT,
    BagelConfig,
    ConfigError,
    InferenceConfig,
    LLMConfig,
    VAEConfig,
    ViTConfig,
    read_json,
)
from .layers.attention import check_backend
from .layers.ops import TORCH, Ops
from .layers.vae import AutoEncoder
from .model import Bagel, BagelModel
from .offload import dispatch
from .quant import BNB_MODES, WEIGHT_MODES, bitsandbytes, quantize_linears
from .tokenizer import MARKERS, BagelTokenizer

OFFICIAL_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
CONFIG_FILES = ("llm_config.json", "vit_config.json")  # required in a folder
OPTIONAL_CONFIGS = ("ae_config.json", "bagel_inference.json")
WEIGHT_NAMES = ("ema", "model", "model_bf16")  # <name>.safetensors or its index, first found wins
INDEX_SUFFIX = ".safetensors.index.json"
AE_FILE = "ae.safetensors"
METADATA_KEY = "comfyui_bagel"
SIDECAR_SUFFIX = ".comfyui-bagel.json"
LATENT_TABLE = "latent_pos_embed.pos_embed"
VIT_TABLE = "vit_pos_embed.pos_embed"
FOLDER_HINT = "Check that llm_config.json / vit_config.json / ae_config.json belong to these weights."


class CheckpointError(ValueError):
    """A model folder or one of its files cannot be loaded; the message names the file and the fix."""


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, without reading its data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated: download it again"
        ) from None


def is_model_folder(folder: Path) -> bool:
    """Whether `folder` holds a BAGEL checkpoint, complete or not: a file only BAGEL folders have."""
    return any((folder / name).is_file() for name in (*CONFIG_FILES, "ema.safetensors"))


def is_bagel_file(path: Path) -> bool:
    """Whether a safetensors file holds a BAGEL network (its two position tables, which no other model
    has). Raises CheckpointError when the file cannot be read."""
    header = read_header(path)
    return LATENT_TABLE in header and VIT_TABLE in header


def find_weights(folder: Path) -> Path:
    """The file holding the network in `folder`: a `.safetensors` file or the index of its shards, by the
    precedence in the module docstring."""
    for name in WEIGHT_NAMES:
        for candidate in (folder / f"{name}.safetensors", folder / f"{name}{INDEX_SUFFIX}"):
            if candidate.is_file():
                return candidate
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder} holds {len(indexes)} shard indexes ({', '.join(i.name for i in indexes)}) and no "
            "ema/model/model_bf16 weights: it is unclear which is the model. Keep the index (and shards) "
            "of this model and move the others out of the folder."
        )
    if not indexes:
        raise CheckpointError(
            f"{folder} is missing ema.safetensors (or model.safetensors, model_bf16.safetensors, or "
            f"shards with their *{INDEX_SUFFIX}); the download may be incomplete"
        )
    return indexes[0]


def read_index(path: Path) -> dict[str, str]:
    """The weight_map (tensor name -> shard file name) of a sharded checkpoint's index file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); it may be truncated: download it again"
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{path} has no weight_map (tensor name -> shard file): it is not a safetensors shard index; "
            "download it again"
        )
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(
                f"{path} maps tensors to {shard!r}, not a .safetensors file name in its folder; download "
                "the index again"
            )
    return weight_map


@dataclass(frozen=True)
class Weights:
    """One network's tensors on disk. `path` is the file errors name (the `.safetensors` file, or the
    index of the shards); `shards` maps each file to read to the tensors it holds, in file order;
    `header` maps every tensor to its shape."""

    path: Path
    shards: dict[Path, tuple[str, ...]]
    header: dict[str, tuple[int, ...]]


def read_weights(path: Path) -> Weights:
    """The tensors of a `.safetensors` file or of the shards an index names, checked (headers only) to be
    exactly what the index lists for each shard."""
    if not path.name.endswith(INDEX_SUFFIX):
        header = read_header(path)
        return Weights(path, {path: tuple(header)}, header)
    listed: dict[str, list[str]] = {}
    for key, shard in read_index(path).items():
        listed.setdefault(shard, []).append(key)
    shards, header = {}, {}
    for name, keys in listed.items():
        shard = path.parent / name
        if not shard.is_file():
            raise CheckpointError(
                f"{path} puts {len(keys)} tensor(s) (first: {keys[0]}) in {name}, which is not in "
                f"{path.parent}: the download is incomplete; download {name} again"
            )
        found, expected = read_header(shard), set(keys)
        absent = [k for k in keys if k not in found]
        extra = [k for k in found if k not in expected]
        parts = [f"{len(absent)} listed tensor(s) missing, first: {', '.join(absent[:3])}"] if absent else []
        if extra:
            parts.append(
                f"{len(extra)} tensor(s) the index does not list there, first: {', '.join(extra[:3])}"
            )
        if parts:
            raise CheckpointError(
                f"{shard} does not hold what {path.name} lists for it ({'; '.join(parts)}): the index and "
                "the shards come from different uploads; download both again"
            )
        shards[shard] = tuple(found)
        header.update(found)
    return Weights(path, shards, header)


@dataclass(frozen=True)
class _Checkpoint:
    """Where one checkpoint's network and configs are. `configs` maps a config file name to its contents
    and the place they came from (named in errors); a name that is absent takes BAGEL-7B-MoT's values (a
    single file only: a folder must have the required ones). `hint` says which configs to check when the
    weights do not fit them; `special_token_ids` is what a single file's metadata records."""

    source: Path
    weights: Weights
    configs: dict[str, tuple[Any, str]]
    hint: str = FOLDER_HINT
    special_token_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    metadata_source: str = ""


def _open_folder(folder: Path) -> _Checkpoint:
    if not is_model_folder(folder):
        raise CheckpointError(
            f"{folder} is not a BAGEL checkpoint folder: it has none of {', '.join(CONFIG_FILES)}, "
            "ema.safetensors (the layout of ByteDance-Seed/BAGEL-7B-MoT)"
        )
    missing = [name for name in CONFIG_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is missing {', '.join(missing)}; the download may be incomplete")
    weights = read_weights(find_weights(folder))
    names = [*CONFIG_FILES, *(name for name in OPTIONAL_CONFIGS if (folder / name).is_file())]
    return _Checkpoint(
        folder, weights, {name: (read_json(folder / name), str(folder / name)) for name in names}
    )


def _is_format(data: Any, name: str) -> bool:
    """Whether `data` is a JSON object of the peer pack's format `name`, version 1 (the only one)."""
    return isinstance(data, dict) and data.get("format") == name and data.get("format_version") == 1


def _file_metadata(path: Path) -> tuple[dict[str, Any], str] | None:
    """A single file's comfyui_bagel metadata object and where it came from (its header or its sidecar),
    or None when it has neither."""
    with safe_open(str(path), framework="pt") as f:
        embedded = (f.metadata() or {}).get(METADATA_KEY)
    sidecar = Path(f"{path}{SIDECAR_SUFFIX}")
    if embedded is not None:
        where = f"{path}'s {METADATA_KEY} metadata"
        text = embedded
    elif sidecar.is_file():
        where = str(sidecar)
        text = sidecar.read_text(encoding="utf-8")
    else:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where} is not valid JSON ({e}): write it again, or remove it") from None
    if embedded is None:
        if not _is_format(data, "comfyui_bagel_sidecar"):
            raise CheckpointError(
                f"{where} is not a sidecar of format comfyui_bagel_sidecar, format_version 1: write it as "
                "the README describes (Fine-tunes and single files), or remove it"
            )
        size = path.stat().st_size
        if data.get("checkpoint_size") != size:
            raise CheckpointError(
                f"{where} describes a file of {data.get('checkpoint_size')} bytes, but {path} has {size}: "
                "the sidecar belongs to another file, or the file is incomplete (download it again)"
            )
        data, where = data.get("metadata"), f"{where} (metadata)"
    if not _is_format(data, METADATA_KEY):
        raise CheckpointError(
            f"{where} is not {METADATA_KEY} metadata of format_version 1 (format: {METADATA_KEY!r}, "
            "format_version: 1): convert the file again, or describe it with a sidecar"
        )
    if data.get("quantization", "none") != "none":
        raise CheckpointError(
            f"{where} says the weights are quantized ({data['quantization']}), which this loader does not "
            "read: use the unquantized (bf16) file; weights fp8 / nf4 / int8 quantize it while loading"
        )
    for key in ("model_configs", "special_token_ids"):
        if not isinstance(data.get(key, {}), dict):
            raise CheckpointError(f"{where}: {key} is not a JSON object; convert the file again")
    return data, where


def _open_file(path: Path) -> _Checkpoint:
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path} is not a .safetensors file: BAGEL loads a model folder (official layout) or a single "
            ".safetensors file"
        )
    weights = read_weights(path)
    found = _file_metadata(path)
    if found is None:
        hint = (
            f"{path} has no {METADATA_KEY} metadata and no sidecar {path.name}{SIDECAR_SUFFIX}, so "
            "BAGEL-7B-MoT's configs were assumed: for another model write that sidecar with its "
            "llm_config.json and vit_config.json (README: Fine-tunes and single files)."
        )
        if path.parent.joinpath("llm_config.json").is_file():
            hint += f" {path.parent} is a model folder: load the folder, not one of its files."
        return _Checkpoint(path, weights, {}, hint)
    data, where = found
    configs = {
        name: (value, f"{where} model_configs[{name!r}]")
        for name, value in data.get("model_configs", {}).items()
    }
    hint = f"Check that the model_configs of {where} belong to these weights."
    return _Checkpoint(path, weights, configs, hint, data.get("special_token_ids", {}), where)


def _open(path: Path) -> _Checkpoint:
    if path.is_dir():
        return _open_folder(path)
    if path.is_file():
        return _open_file(path)
    kind = "file" if path.suffix == ".safetensors" else "folder"
    raise CheckpointError(f"model {kind} {path} does not exist")


def _table_side(header: dict[str, tuple[int, ...]], key: str, path: Path) -> int:
    if key not in header:
        raise CheckpointError(f"{path} lacks {key}: this is not a BAGEL (MoT, visual gen + und) checkpoint")
    rows = header[key][0]
    side = math.isqrt(rows)
    if side * side != rows:
        raise CheckpointError(f"{path}: {key} has {rows} rows, not a square grid")
    return side


def _config(ckpt: _Checkpoint) -> BagelConfig:
    """The model's configuration; the two table sizes come from the weights' headers."""

    def part(cls, name: str, default):
        if name not in ckpt.configs:
            return default
        data, source = ckpt.configs[name]
        return cls.from_dict(data, source)

    base, weights = BAGEL_7B_MOT, ckpt.weights
    return BagelConfig(
        llm=part(LLMConfig, "llm_config.json", base.llm),
        vit=part(ViTConfig, "vit_config.json", base.vit),
        vae=part(VAEConfig, "ae_config.json", base.vae),
        inference=part(InferenceConfig, "bagel_inference.json", base.inference),
        max_latent_size=_table_side(weights.header, LATENT_TABLE, weights.path),
        vit_max_num_patch_per_side=_table_side(weights.header, VIT_TABLE, weights.path),
    )


def _read(path: Path) -> tuple[_Checkpoint, BagelConfig]:
    """A checkpoint's files and configuration; a config that cannot be used is an error naming it (and,
    once the weights are known, where the configs came from)."""
    try:
        ckpt = _open(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        return ckpt, _config(ckpt)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}. {ckpt.hint}") from None


def read_config(path: Path | str) -> BagelConfig:
    """The configuration of a model folder or single file (see the module docstring for where from)."""
    return _read(Path(path))[1]


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


def _ae_file(ckpt: _Checkpoint, vae: Path | str | None) -> Path:
    """The autoencoder's file: `vae` when given, else the folder's ae.safetensors."""
    if vae is not None:
        if not Path(vae).is_file():
            raise CheckpointError(f"autoencoder file {vae} does not exist; give FLUX's ae.safetensors")
        return Path(vae)
    if not ckpt.source.is_dir():
        raise CheckpointError(
            f"{ckpt.source} is a single-file checkpoint without the autoencoder: give FLUX's "
            "ae.safetensors as vae (--vae on the command line)"
        )
    if not (ckpt.source / AE_FILE).is_file():
        raise CheckpointError(
            f"{ckpt.source} is missing {AE_FILE}; the download may be incomplete (or give FLUX's "
            "ae.safetensors as vae: --vae on the command line)"
        )
    return ckpt.source / AE_FILE


def _tokenizer(ckpt: _Checkpoint, folder: Path | str | None, cfg: BagelConfig) -> BagelTokenizer:
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
    ckpt, cfg = _read(Path(path))
    ae = read_weights(_ae_file(ckpt, vae))
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
