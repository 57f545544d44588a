"""LoRA adapters for BAGEL's decoder: read them (PEFT format) and merge them into a model's weights.

BAGEL trainers save adapters with PEFT's `save_pretrained`: a folder holding `adapter_config.json` (r,
lora_alpha, rank_pattern, alpha_pattern, use_rslora) and `adapter_model.safetensors` with one pair of
factors per adapted linear layer, `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r). The merged weight is W + strength * scale * B @ A, scale = lora_alpha / r (lora_alpha / sqrt(r)
with rsLoRA). `<module>` is named in the tree of whatever module the trainer wrapped; `LAYOUTS` maps each
known tree onto the official checkpoint's names (those of `Bagel`), and a name that lands on no linear
layer of the model is an error listing it.

A merged model is a new model object: `apply` leaves its input untouched (contexts are tied to the model
object that built them, so contexts of the base model are refused by the adapted one), sharing every
tensor it does not change. `load` merges into a freshly loaded model in place, which no context has seen.

What this does not do: DoRA, LoRA on embeddings, trained biases, `modules_to_save`, kohya's
`lora_up`/`lora_down` files (no BAGEL trainer writes them), or quantized weights (fp8 / nf4 / int8: a merge
would quantize the base weights a second time; LoRA needs `weights="native"`). Keeping an adapter
unmerged and patching it in when a model is loaded is the host's business (ComfyUI's ModelPatcher, see
`nodes/comfy_bridge.py`); this module gives it the factors and scales.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .model import Bagel, BagelModel
from .quant import BnbLinear, Fp8Linear

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")

# Module-name prefix in an adapter -> the same module in `Bagel` (the official checkpoint's names), first
# match wins; any other name is taken as it is (Bagel's own top-level modules: vae2llm, connector, ...).
LAYOUTS = (
    ("language_model.", "language_model."),  # the whole Bagel wrapped (official names)
    ("model.", "language_model.model."),  # the language model alone (Flow-Factory wraps bagel.language_model)
    ("lm_head", "language_model.lm_head"),  # ... and its head
    ("layers.", "language_model.model.layers."),  # decoder layers at the top (verl-omni's BagelForTraining)
)
_SHOWN = 5  # names an error message lists before "and N more"


class LoraError(ValueError):
    """An adapter cannot be read, or does not fit the model; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)
class LowRank:
    """One adapted linear layer: its weight W becomes W + strength * scale * up @ down."""

    name: str  # the module as the adapter file names it (for messages)
    down: torch.Tensor  # lora_A (r, in)
    up: torch.Tensor  # lora_B (out, r)
    scale: float  # lora_alpha / r (or / sqrt(r)): the adapter's own factor, before the user's strength

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, strength: float, device: torch.device) -> torch.Tensor:
        """strength * scale * up @ down in float32 on `device` (out, in)."""
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return (up @ down) * (strength * self.scale)


@dataclass(frozen=True, eq=False)
class Adapter:
    """A read adapter: the factors of each weight it changes, keyed by the weight's name in `Bagel`
    (e.g. `language_model.model.layers.1.self_attn.q_proj_moe_gen.weight`)."""

    path: Path
    weights: dict[str, LowRank]


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _bagel_module(name: str) -> str:
    """The `Bagel` module an adapter's module name (PEFT prefix already removed) stands for."""
    for prefix, target in LAYOUTS:
        if name.startswith(prefix):
            return target + name[len(prefix) :]
    return name


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the end of the module name
    at a dot boundary, else the adapter-wide value."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name):
            return value
    return default


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraError(f"{path} cannot be read as JSON ({e}); copy the adapter's folder again") from None
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoraError(f"{path} describes a {kind} adapter; only LoRA adapters can be used")
    if config.get("use_dora"):
        raise LoraError(f"{path} describes a DoRA adapter (use_dora); only plain LoRA can be merged")
    missing = [field for field in ("r", "lora_alpha") if not isinstance(config.get(field), (int, float))]
    if missing:
        raise LoraError(f"{path} gives no {' or '.join(missing)}: the adapter's scale is unknown")
    return config


def _scale(config: dict, name: str, rank: int, path: Path) -> float:
    """lora_alpha / r for module `name` (as the trainer named it), checked against the factors' rank."""
    r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    if r != rank:
        raise LoraError(
            f"{path} gives {name} rank {r}, but its lora_A has {rank} rows: the config belongs to another "
            "adapter; copy the adapter's folder again"
        )
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{path} is not a readable safetensors file ({e}); copy it again") from None


def read(path: Path | str) -> Adapter:
    """An adapter in PEFT format: its folder, or its `adapter_model.safetensors` with `adapter_config.json`
    beside it. Everything in the file is checked here, before any model is touched."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise LoraError(f"LoRA {file} does not exist; give a PEFT adapter folder or its {WEIGHTS_FILE}")
    if not (file.parent / CONFIG_FILE).is_file():
        raise LoraError(
            f"{file} has no {CONFIG_FILE} beside it, so its scale (lora_alpha / r) is unknown; keep the "
            "adapter's folder as the trainer saved it"
        )
    config = _read_config(file.parent / CONFIG_FILE)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in _read_tensors(file).items():
        found = _FACTOR.fullmatch(key)
        if found is None:
            stray.append(key)
        else:
            factors.setdefault(found["module"], {})[found["factor"]] = tensor
    if stray:
        raise LoraError(
            f"{file} holds {len(stray)} tensor(s) that are not LoRA factors (*.lora_A.weight / "
            f"*.lora_B.weight): {_shown(stray)}. DoRA, embedding LoRA, trained biases and modules_to_save "
            "are not supported"
        )
    if not factors:
        raise LoraError(f"{file} holds no LoRA factors")
    weights: dict[str, LowRank] = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(
                f"{file}: {module} has lora_{''.join(pair)} but not its partner; the file is damaged"
            )
        down, up = pair["A"], pair["B"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{file}: {module} has lora_A {list(down.shape)} and lora_B {list(up.shape)}, not the "
                "(r, in) and (out, r) factors of a linear layer"
            )
        name = module.removeprefix(PEFT_PREFIX)
        key = _bagel_module(name) + ".weight"
        if key in weights:
            raise LoraError(f"{file}: {weights[key].name} and {module} both adapt {key}")
        weights[key] = LowRank(
            module, down, up, _scale(config, name, down.shape[0], file.parent / CONFIG_FILE)
        )
    return Adapter(file, weights)


def _quantized_mode(module: nn.Module) -> str | None:
    if isinstance(module, Fp8Linear):
        return "fp8"
    if isinstance(module, BnbLinear):
        return module.mode
    return None


def check(net: Bagel, adapter: Adapter, strength: float) -> None:
    """Raise a LoraError unless every weight the adapter changes is a native linear weight of the network
    `net` of the factors' shape, and `strength` is a finite number."""
    if not math.isfinite(strength):
        raise LoraError(f"LoRA strength {strength} is not a finite number")
    unmatched, misshaped = [], []
    for key, low in adapter.weights.items():
        try:
            module = net.get_submodule(key.removesuffix(".weight"))
        except AttributeError:
            unmatched.append(low.name)
            continue
        mode = _quantized_mode(module)
        if mode is not None:
            raise LoraError(
                f"LoRA {adapter.path} cannot be merged into weights stored as {mode}: load the model with "
                "weights native (Loader: weights; CLI: --weights native)"
            )
        if not isinstance(module, nn.Linear):
            unmatched.append(low.name)
        elif tuple(module.weight.shape) != (low.up.shape[0], low.down.shape[1]):
            misshaped.append(
                f"{low.name} {[low.up.shape[0], low.down.shape[1]]} vs {list(module.weight.shape)}"
            )
    if unmatched:
        raise LoraError(
            f"LoRA {adapter.path}: {len(unmatched)} adapted module(s) match no linear layer of this BAGEL "
            f"model: {_shown(unmatched)}. Is it an adapter for another model?"
        )
    if misshaped:
        raise LoraError(
            f"LoRA {adapter.path}: {len(misshaped)} module(s) have another shape in this model (adapter vs "
            f"model): {_shown(misshaped)}. It was trained on a model of another size"
        )


@torch.no_grad()
def merge(net: Bagel, adapter: Adapter, strength: float) -> None:
    """Replace each adapted weight of `net` by a new parameter holding the merged weight (computed in
    float32, stored in the weight's dtype); the old tensors are not written to."""
    for key, low in adapter.weights.items():
        module = net.get_submodule(key.removesuffix(".weight"))
        weight = module.weight
        merged = weight.float() + low.delta(strength, weight.device)
        module.weight = nn.Parameter(merged.to(weight.dtype), requires_grad=False)


def apply(model: BagelModel, adapter: Adapter, strength: float = 1.0) -> BagelModel:
    """A new model: `model` with `adapter` merged at `strength`. `model` is unchanged; the two share every
    tensor the adapter does not change (memory: one copy of the adapted weights).

    A model that accelerate placed (a device map, CPU or disk offload) is refused: its offloaded layers
    run from weights accelerate keeps apart, which a merge would never reach."""
    if any(hasattr(m, "_hf_hook") for m in model.net.modules()):
        raise LoraError(
            f"LoRA {adapter.path} cannot be applied to a model placed by a device map (offloaded layers "
            "would keep their base weights): give it while loading, load(..., loras=[(adapter, strength)]) "
            "or --lora on the command line"
        )
    check(model.net, adapter, strength)
    shared = {id(t): t for t in itertools.chain(model.net.parameters(), model.net.buffers())}
    net = copy.deepcopy(model.net, shared)  # new modules around the same tensors
    merge(net, adapter, strength)
    return BagelModel(net, model.vae, model.tokenizer, model.config, model.source)
