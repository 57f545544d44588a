"""Trainable LoRA factors on a frozen BAGEL network, saved as the PEFT adapters `bagel_model.lora` reads.

Each adapted linear layer keeps its module and its weight as they are (native, fp8, nf4 or int8, ComfyUI's
casting layers included): a forward hook adds `scale * B(A(dropout(x)))` to its output, in float32. So the
model tree, its state dict and everything that manages its weights stay untouched, quantized bases train
(QLoRA) with no layer of their own, and `detach` gives the base model back exactly. A starts as PEFT's
default (Kaiming-uniform, a = sqrt(5)), B at zero: an adapter starts as the identity.

Targets are named by expert (`TARGETS`): the generation expert's attention and MLP projections for image
examples, the understanding expert's for text answers. `save` writes `adapter_config.json` and
`adapter_model.safetensors` with keys `base_model.model.<official module name>.lora_{A,B}.weight`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..lora import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, read
from ..model import Bagel

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_LAYER = r"language_model\.model\.layers\.\d+\."
# Expert -> the decoder modules it owns (official names), as one regular expression each.
_EXPERTS = {
    "gen": rf"{_LAYER}(self_attn\.({'|'.join(_ATTENTION)})_moe_gen|mlp_moe_gen\.({'|'.join(_MLP)}))",
    "und": rf"{_LAYER}(self_attn\.({'|'.join(_ATTENTION)})|mlp\.({'|'.join(_MLP)}))",
}
TARGETS = {"gen": ("gen",), "und": ("und",), "all": ("gen", "und")}
# Names in adapter_config.json's target_modules, per expert (PEFT matches them against module names' ends).
_PEFT_NAMES = {
    "gen": [f"{n}_moe_gen" for n in _ATTENTION] + [f"mlp_moe_gen.{n}" for n in _MLP],
    "und": list(_ATTENTION) + [f"mlp.{n}" for n in _MLP],
}


@dataclass(frozen=True)
class LoraShape:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank} must be at least 1")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha {self.alpha} must be a positive number")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout {self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraFactors(nn.Module):
    """A (rank, in) and B (out, rank) of one linear layer, in float32."""

    def __init__(self, in_features: int, out_features: int, shape: LoraShape, generator: torch.Generator):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(shape.rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, shape.rank))
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.scale = shape.scale
        self.dropout = nn.Dropout(shape.dropout) if shape.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.float())
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scale


def targeted(net: nn.Module, experts: tuple[str, ...]) -> list[str]:
    """Names of the linear layers of `net` that adapters on `experts` adapt (in module order)."""
    unknown = set(experts) - set(_EXPERTS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; known: {', '.join(TARGETS)}")
    pattern = re.compile("|".join(f"(?:{_EXPERTS[e]})" for e in experts))
    return [name for name, _ in net.named_modules() if pattern.fullmatch(name)]


class Adapters(nn.Module):
    """The LoRA factors of every targeted layer of one network, attached by forward hooks."""

    def __init__(self, net: Bagel, experts: tuple[str, ...], shape: LoraShape, seed: int):
        super().__init__()
        self.shape, self.experts = shape, experts
        self.names = targeted(net, experts)
        self.factors = nn.ModuleList()
        generator = torch.Generator().manual_seed(seed)
        self._modules_by_name = {name: net.get_submodule(name) for name in self.names}
        for module in self._modules_by_name.values():
            self.factors.append(LoraFactors(module.in_features, module.out_features, shape, generator))
        if not self.names:
            raise ValueError(f"no layer of this model matches the LoRA targets {', '.join(experts)}")
        self._hooks: list = []
        device = net.device
        self.to(device)

    def attach(self) -> None:
        """Add the factors' output to their layers' from now on."""
        if self._hooks:
            return
        for name, factors in zip(self.names, self.factors, strict=True):
            module = self._modules_by_name[name]
            self._hooks.append(module.register_forward_hook(_adding(factors)))

    def detach(self) -> None:
        """The base network again: remove every hook."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's keys -> factors (contiguous float32 copies on the CPU)."""
        out = {}
        for name, f in zip(self.names, self.factors, strict=True):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.lora_A.detach().float().cpu().contiguous()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.lora_B.detach().float().cpu().contiguous()
        return out

    def save(self, folder: Path, base_model: str) -> Path:
        """`adapter_config.json` + `adapter_model.safetensors` in `folder` (each written whole, then renamed
        into place, so an interrupted save leaves the previous adapter)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "r": self.shape.rank,
            "lora_alpha": self.shape.alpha,
            "lora_dropout": self.shape.dropout,
            "target_modules": [n for e in self.experts for n in _PEFT_NAMES[e]],
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "fan_in_fan_out": False,
            "inference_mode": True,
            "base_model_name_or_path": base_model,
        }
        weights = folder / (WEIGHTS_FILE + ".tmp")
        save_file(self.tensors(), str(weights), metadata={"format": "pt"})
        (folder / (CONFIG_FILE + ".tmp")).write_text(json.dumps(config, indent=2))
        weights.rename(folder / WEIGHTS_FILE)
        (folder / (CONFIG_FILE + ".tmp")).rename(folder / CONFIG_FILE)
        return folder / WEIGHTS_FILE

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        """Take the factors of a saved adapter of the same targets and rank (resuming)."""
        adapter = read(folder)
        by_key = {low.name.removeprefix(PEFT_PREFIX): low for low in adapter.weights.values()}
        missing = [n for n in self.names if n not in by_key]
        extra = sorted(set(by_key) - set(self.names))
        if missing or extra:
            raise ValueError(
                f"the adapter in {folder} adapts other layers than targets {'+'.join(self.experts)} "
                f"({len(missing)} missing, {len(extra)} extra): resume with the targets it was trained with"
            )
        for name, f in zip(self.names, self.factors, strict=True):
            low = by_key[name]
            if low.rank != self.shape.rank or not math.isclose(low.scale, self.shape.scale):
                raise ValueError(
                    f"the adapter in {folder} has rank {low.rank} and scale {low.scale:g}, not rank "
                    f"{self.shape.rank} and alpha/rank {self.shape.scale:g}: resume with its rank and alpha"
                )
            f.lora_A.copy_(low.down)
            f.lora_B.copy_(low.up)


def _adding(factors: LoraFactors):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + factors(args[0]).to(out.dtype)

    return hook
