"""Which files a BAGEL checkpoint is, in every layout it is published in, read strictly.

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

Layout discovery only: which files a path is, their headers (names and shapes, never the data) and the
configuration they describe (`read_checkpoint`). Reading tensors into a model is `checkpoint.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

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
class Checkpoint:
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


def _open_folder(folder: Path) -> Checkpoint:
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
    return Checkpoint(
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


def _open_file(path: Path) -> Checkpoint:
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
        return Checkpoint(path, weights, {}, hint)
    data, where = found
    configs = {
        name: (value, f"{where} model_configs[{name!r}]")
        for name, value in data.get("model_configs", {}).items()
    }
    hint = f"Check that the model_configs of {where} belong to these weights."
    return Checkpoint(path, weights, configs, hint, data.get("special_token_ids", {}), where)


def _open(path: Path) -> Checkpoint:
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


def _config(ckpt: Checkpoint) -> BagelConfig:
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


def read_checkpoint(path: Path) -> tuple[Checkpoint, BagelConfig]:
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
    return read_checkpoint(Path(path))[1]


def ae_file(ckpt: Checkpoint, vae: Path | str | None) -> Path:
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
