"""Spread the decoder over several devices, or offload it to the CPU and the disk, with accelerate.

accelerate is the engine (device maps, budgets, hooks that bring offloaded weights in for each forward and
move activations between devices); this module only adapts BAGEL to it:
- a device map is placed on units whose forward BAGEL calls as a whole: the model calls some submodules
  directly (the token embedding, the LM head, the ViT's parts), so a map entry on a container such as
  `language_model` would attach accelerate's hook where no forward ever runs and leave those weights on
  the meta device. Such entries are split into their children;
- the network's execution device (where inputs are made) and each decoder layer's (where its K/V cache
  lives, so the hook never copies the cache the layer writes into) are recorded for the model to use.

accelerate is imported only here and only when a device map or a budget is asked for: it stays optional.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .layers.decoder import MoTDecoderLayer
from .layers.vit import SiglipEncoderLayer
from .model import Bagel

# Modules BAGEL runs as a whole (or that hold their own parameters): a device map may place them.
UNITS = (MoTDecoderLayer, SiglipEncoderLayer)
NO_SPLIT = [cls.__name__ for cls in UNITS]
MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class OffloadError(ValueError):
    """A device map or memory budget that cannot be used; the message says what to change."""


def _accelerate():
    try:
        import accelerate
    except ImportError:
        raise OffloadError(
            "device maps and memory budgets need the accelerate package (pip install accelerate)"
        ) from None
    return accelerate


def parse_memory(items: list[str]) -> dict[str | int, str]:
    """`["cuda:0=20GiB", "cpu=64GiB"]` -> accelerate's max_memory {0: "20GiB", "cpu": "64GiB"}."""
    budget: dict[str | int, str] = {}
    for item in items:
        device, sep, size = item.partition("=")
        if not sep or not size:
            raise OffloadError(f"--max-memory {item!r} must be DEVICE=SIZE, e.g. cuda:0=20GiB or cpu=64GiB")
        key: str | int = device
        if device.startswith("cuda:") and device[5:].isdigit():
            key = int(device[5:])
        elif device.isdigit():
            key = int(device)
        elif device not in ("cpu", "disk", "mps"):
            raise OffloadError(f"--max-memory device {device!r} is unknown; use cuda:N, cpu or disk")
        budget[key] = size
    return budget


def _split_containers(device_map: dict[str, str | int], net: nn.Module) -> dict[str, str | int]:
    """Replace every entry on a module BAGEL does not run as a whole by entries on its children."""
    out: dict[str, str | int] = {}
    pending = list(device_map.items())
    while pending:
        name, device = pending.pop(0)
        module = net.get_submodule(name) if name else net
        children = list(module.named_children())
        if isinstance(module, UNITS) or not children:
            out[name] = device
            continue
        if any(True for _ in module.named_parameters(recurse=False)):
            raise OffloadError(f"{name or 'the model'} holds its own weights and cannot be split further")
        prefix = f"{name}." if name else ""
        pending[:0] = [(prefix + child, device) for child, _ in children]
    return out


def dispatch(
    net: Bagel,
    device_map: str | dict[str, str | int],
    max_memory: dict[str | int, str] | None,
    offload_folder: Path | str | None,
) -> torch.device:
    """Place `net` (loaded on the CPU) by `device_map`: an explicit map, or a strategy name as accelerate
    (and transformers) mean it (`MAP_STRATEGIES`): "sequential" fills `max_memory` in order (GPUs, then the
    CPU, then `offload_folder` on disk); "auto" and "balanced" first spread the GPUs' budgets evenly,
    "balanced_low_0" keeps GPU 0 as empty as it can (room for the generation's activations there).
    Returns the execution device, where inputs must be made."""
    accelerate = _accelerate()
    if isinstance(device_map, str):
        if device_map not in MAP_STRATEGIES:
            raise OffloadError(f"device map {device_map!r} is unknown; use {', '.join(MAP_STRATEGIES)}")
        budget = max_memory
        if device_map != "sequential":
            budget = accelerate.utils.get_balanced_memory(
                net, max_memory=max_memory, no_split_module_classes=NO_SPLIT, dtype=net.dtype,
                low_zero=device_map == "balanced_low_0",
            )  # fmt: skip
        device_map = accelerate.infer_auto_device_map(
            net, max_memory=budget, no_split_module_classes=NO_SPLIT, dtype=net.dtype
        )
    device_map = _split_containers(dict(device_map), net)
    if "disk" in device_map.values() and offload_folder is None:
        raise OffloadError("the device map offloads to disk: give an offload folder (--offload-folder DIR)")
    accelerate.dispatch_model(
        net, device_map=device_map, offload_dir=None if offload_folder is None else str(offload_folder)
    )
    accelerators = [d for d in device_map.values() if d not in ("cpu", "disk")]
    execution = _device(accelerators[0] if accelerators else "cpu")
    net.place(execution, [_execution_device(layer, execution) for layer in net.language_model.model.layers])
    return execution


def _execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where accelerate runs `module` (its hook's device), else where its weights are."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return _device(device)
    weight = next(module.parameters())
    return default if weight.device.type == "meta" else weight.device


def _device(name: str | int | torch.device) -> torch.device:
    """A device as accelerate names it: an int is a CUDA index."""
    return torch.device("cuda", name) if isinstance(name, int) else torch.device(name)
