"""Helpers that several test files share (test files import this module, not each other).

- The pack imported the way ComfyUI imports a custom-node folder (`NODES`, `run` a node as its executor
  does), for tests/test_nodes.py, tests/test_lora.py and the files beside them.
- LoRA adapter files written by hand (`gen_expert_factors`, `write_adapter`, `write_merged_model`), for
  tests/test_lora.py and tests/comfyui/test_comfyui_lora.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bagel_model.bundled import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui_bagel_mot"
FAST = {"steps": 3, "max_new_tokens": 8}  # overrides for speed, applied where a node has the input


def _import_pack() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


pack = _import_pack()
lib = pack.bagel_model
bridge = importlib.import_module(f"{PACK}.nodes.comfy_bridge")
images = importlib.import_module(f"{PACK}.nodes.images")
loader = importlib.import_module(f"{PACK}.nodes.loader")
hub = importlib.import_module(f"{PACK}.nodes.hub")
tiny = importlib.import_module(f"{PACK}.bagel_model.tiny")
NODES = pack.NODE_CLASS_MAPPINGS


def defaults(node_id: str) -> dict:
    """What a freshly placed node sends: every required widget at its default."""
    required = NODES[node_id].INPUT_TYPES()["required"]
    values = {name: spec[1]["default"] for name, spec in required.items() if "default" in spec[1]}
    values.update({k: v for k, v in FAST.items() if k in required})
    return values


def run(node_id: str, **inputs):
    """Call a node as ComfyUI's executor does: an instance, its FUNCTION, inputs as keywords."""
    cls = NODES[node_id]
    out = getattr(cls(), cls.FUNCTION)(**{**defaults(node_id), **inputs})
    result = out["result"] if isinstance(out, dict) else out
    assert len(result) == len(cls.RETURN_TYPES)
    for value, kind in zip(result, cls.RETURN_TYPES, strict=True):
        if kind == "IMAGE":
            assert value.dtype == torch.float32 and value.ndim == 4 and value.shape[-1] == 3
            assert 0.0 <= value.min() and value.max() <= 1.0
        elif kind == "STRING":
            assert isinstance(value, str)
        elif kind == "BAGEL_CONTEXT":
            assert isinstance(value, lib.Context)
        elif kind == "LATENT":
            assert value["samples"].dtype == torch.float32 and value["samples"].ndim == 4
    return out


# -- LoRA adapter files ------------------------------------------------------------------------------

# What the LoRA tests draw (5 steps at the bundled model's 48 px size) and the adapter they write.
PROMPT = "a red circle at the top left, a blue square at the center"
STEPS, SEED = 5, 1
RANK, ALPHA, STRENGTH = 4, 8.0, 0.8


def gen_expert_factors(seed: int = 0, size: float = 0.25) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) factors of rank RANK for every generation-expert linear layer of the bundled model,
    keyed by the module's official name."""
    weights = load_file(str(default_model_dir() / "ema.safetensors"))
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for key, w in weights.items():
        if "_moe_gen" in key and w.ndim == 2:
            a = torch.randn(RANK, w.shape[1], generator=g) * size
            factors[key.removesuffix(".weight")] = (a, torch.randn(w.shape[0], RANK, generator=g) * size)
    return factors


def write_adapter(folder: Path, factors: dict, config: dict | None = None, prefix: str = "") -> Path:
    """A PEFT adapter folder: `base_model.model.<prefix><module>.lora_A/B.weight` plus its config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{prefix}{module}.lora_A.weight"] = a.clone()
        tensors[f"base_model.model.{prefix}{module}.lora_B.weight"] = b.clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = config or {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_merged_model(folder: Path, factors: dict, scale: float) -> Path:
    """The bundled model's folder with W + scale * B @ A written into its weights, merged here by hand."""
    shutil.copytree(default_model_dir(), folder)
    weights = load_file(str(folder / "ema.safetensors"))
    for module, (a, b) in factors.items():
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + scale * (b @ a)
    save_file(weights, str(folder / "ema.safetensors"))
    return folder
