"""Read and write model folders in the official BAGEL layout, strictly.

Layout (as published in ByteDance-Seed/BAGEL-7B-MoT): `llm_config.json`, `vit_config.json`,
`ema.safetensors` (the network), `ae.safetensors` (the FLUX autoencoder), tokenizer files. Optional files
of ours: `ae_config.json` (a smaller AE) and `bagel_inference.json` (image limits, default size).

Loading builds the modules on the `meta` device, checks every tensor name and shape against the file
headers before reading any data, then streams tensors one at a time into place (converted to the target
dtype on the way), so a bf16 checkpoint never exists as an fp32 copy in RAM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import BagelConfig, ConfigError, InferenceConfig, LLMConfig, VAEConfig, ViTConfig
from .layers.attention import check_backend
from .layers.vae import AutoEncoder
from .model import Bagel, BagelModel
from .quant import BNB_MODES, WEIGHT_MODES, bitsandbytes, quantize_linears
from .tokenizer import BagelTokenizer

REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
LATENT_TABLE = "latent_pos_embed.pos_embed"
VIT_TABLE = "vit_pos_embed.pos_embed"


class CheckpointError(ValueError):
    """A model folder or one of its files cannot be loaded; the message names the file and the fix."""


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if len(missing) == len(REQUIRED_FILES):
        raise CheckpointError(
            f"{folder} is not a BAGEL checkpoint folder: it has none of {', '.join(REQUIRED_FILES)} "
            "(the layout of ByteDance-Seed/BAGEL-7B-MoT)"
        )
    if missing:
        raise CheckpointError(f"{folder} is missing {', '.join(missing)}; the download may be incomplete")


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, without reading its data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated: download it again"
        ) from None


def _table_side(header: dict[str, tuple[int, ...]], key: str, path: Path) -> int:
    if key not in header:
        raise CheckpointError(f"{path} lacks {key}: this is not a BAGEL (MoT, visual gen + und) checkpoint")
    rows = header[key][0]
    side = math.isqrt(rows)
    if side * side != rows:
        raise CheckpointError(f"{path}: {key} has {rows} rows, not a square grid")
    return side


def read_config(folder: Path | str) -> BagelConfig:
    """The model's configuration from its folder; the two table sizes come from the weights' headers."""
    folder = Path(folder)
    _check_folder(folder)
    header = read_header(folder / "ema.safetensors")
    try:
        return BagelConfig(
            llm=LLMConfig.from_json(folder / "llm_config.json"),
            vit=ViTConfig.from_json(folder / "vit_config.json"),
            vae=VAEConfig.from_json(folder / "ae_config.json")
            if (folder / "ae_config.json").is_file()
            else VAEConfig(),
            inference=InferenceConfig.from_json(folder / "bagel_inference.json")
            if (folder / "bagel_inference.json").is_file()
            else InferenceConfig(),
            max_latent_size=_table_side(header, LATENT_TABLE, folder / "ema.safetensors"),
            vit_max_num_patch_per_side=_table_side(header, VIT_TABLE, folder / "ema.safetensors"),
        )
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_keys(path: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """Raise one error listing the first missing, unexpected and mis-shaped tensors."""
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
        f"{path} does not match the model its config files describe: " + "; ".join(parts) + ". "
        "Check that llm_config.json / vit_config.json / ae_config.json belong to these weights."
    )


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def stream_weights(
    module: nn.Module, path: Path, device: torch.device, dtype: torch.dtype, weight_mode: str = "native"
) -> None:
    """Check `path` against the meta-built `module`, then fill it tensor by tensor (quantizing on the way
    in a quantized mode: each weight is converted on the device right after it is read)."""
    check_keys(path, _expected_shapes(module), read_header(path))
    quantized = set() if weight_mode == "native" else quantize_linears(module, weight_mode, dtype)
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key).to(device=device)
            if key in quantized:
                module.get_submodule(key.rpartition(".")[0]).store(tensor)
            else:
                _set_tensor(module, key, tensor.to(dtype=dtype))


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


def load(
    path: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
    attention: str = "auto",
    weights: str = "native",
) -> BagelModel:
    """Load an official-layout BAGEL folder. Strict: any missing, extra or mis-shaped tensor is an error.

    `attention` picks the attention backend (`layers.attention.BACKENDS`); `weights` how the decoder's
    linear weights are stored (`quant.WEIGHT_MODES`: "native" in `dtype`, or "fp8" / "nf4" / "int8" with
    compute in `dtype`). Unusable choices are refused here, before any weight is read."""
    check_backend(attention)
    if weights not in WEIGHT_MODES:
        raise CheckpointError(f"weight mode {weights!r} is unknown; choose one of {', '.join(WEIGHT_MODES)}")
    if weights in BNB_MODES:
        bitsandbytes()  # a missing package is reported before any weight is read
    folder = Path(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    cfg = read_config(folder)
    tokenizer = BagelTokenizer(folder)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the embedding only "
            f"{cfg.llm.vocab_size} rows; the tokenizer files belong to another model"
        )
    with torch.device("meta"), _NoInitOnMeta():
        net, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    stream_weights(net, folder / "ema.safetensors", device, dtype, weights)
    stream_weights(vae, folder / "ae.safetensors", device, vae_dtype)
    net.attn_backend = attention
    return BagelModel(net=net.eval(), vae=vae.eval(), tokenizer=tokenizer, config=cfg, source=folder)


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
