"""ComfyUI's own memory manager loads BAGEL partly, and the partly loaded model draws the same image.

The pack builds BAGEL from ComfyUI's weight-casting layers (`comfy_bridge.layer_ops`), so ComfyUI's
ModelPatcher can leave layers off the compute device and bring each one in for its forward. On the CPU
ComfyUI never needs to, so the test forces it the way ComfyUI does under a small memory budget
(`ModelPatcher.load(device, lowvram_model_memory=...)`), in ComfyUI's own Python, and compares with the
full load's image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import IMPORT_PACK, ROOT

SCRIPT = (
    r"""
import importlib.util, json, logging, sys
comfy_dir, pack = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
args.cpu = True
import torch

"""
    + IMPORT_PACK
    + r"""messages = []


class Record(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())


logging.getLogger().addHandler(Record())
logging.getLogger().setLevel(logging.INFO)

(managed,) = module.NODE_CLASS_MAPPINGS["BAGELLoader"]().load(lib.bundled.DEFAULT_NAME, "auto", "auto")
settings = lib.FlowSettings(num_steps=5)
prompt = "a red circle at the top left, a blue square at the center"
model = managed.ready()
full = lib.generate_images(model, prompt, settings=settings, seed=3).images[0]
casting = sum(1 for m in model.modules() if getattr(m, "comfy_cast_weights", False))

patcher = managed.patcher
patcher.unpatch_model(patcher.offload_device)
patcher.load(torch.device("cpu"), lowvram_model_memory=2 * 1024 * 1024)
partial = lib.generate_images(model, prompt, settings=settings, seed=3).images[0]
print(json.dumps({
    "lowvram": bool(patcher.model.model_lowvram),
    "casting_before": casting,
    "casting_after": sum(1 for m in model.modules() if getattr(m, "comfy_cast_weights", False)),
    "castable": sum(1 for m in model.modules() if hasattr(m, "comfy_cast_weights")),
    "logged": [m for m in messages if m.startswith("loaded partially")],
    "diff": int((torch.tensor(list(full.getdata())) - torch.tensor(list(partial.getdata()))).abs().max()),
}))
"""
)


def test_a_partly_loaded_model_draws_the_full_loads_image(comfy_dir: Path, tmp_path: Path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run(
        [python, "-c", SCRIPT, str(comfy_dir), str(ROOT)],
        cwd=comfy_dir, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(result)
    assert result["castable"] > 50  # every weighted layer is one of ComfyUI's casting layers
    assert result["casting_before"] == 0  # a full load runs them as plain torch layers
    assert result["lowvram"] and result["logged"], result  # ComfyUI reports the model partly loaded
    assert result["casting_after"] > 0  # layers left out now bring their weights in per forward
    assert result["diff"] <= 1, result
