"""The Loader's layers under the newest ComfyUI's `comfy/ops.py`, with dynamic VRAM's lazy layers on and off.

No ComfyUI newer than the pinned one can run here whole, but the layers the Loader builds BAGEL from come
from one file: `shared/comfyui/newest/` holds the newest release's `comfy/ops.py` (and what it newly
imports) and `overlay.sh`, which lays them over the pinned tree. With `memory_management.aimdo_enabled`
on (what the newest ComfyUI sets on every NVIDIA card) its `Linear` is built with no weight at all and
gets one only through PyTorch's loading hook; this test loads the bundled model through the Loader node on
those layers and compares the image and the answer with a plain load, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IMPORT_PACK, ROOT, missing

SHARED = Path(os.environ.get("BAGEL_SHARED_DIR", ROOT.parent / "shared"))

SCRIPT = (
    r"""
import importlib.util, json, sys
comfy_dir, pack, aimdo = sys.argv[1], sys.argv[2], sys.argv[3] == "on"
sys.path[:0] = [comfy_dir, comfy_dir + "/_deps"]
from comfy.cli_args import args
args.cpu = True
import comfy.model_management
import comfy.memory_management
comfy.memory_management.aimdo_enabled = aimdo
import comfy.ops
"""
    + IMPORT_PACK
    + r"""
(managed,) = module.NODE_CLASS_MAPPINGS["BAGELLoader"]().load(lib.bundled.DEFAULT_NAME, "auto", "auto")
model = managed.ready()
plain = lib.load(lib.bundled.default_model_dir())
settings = lib.FlowSettings(num_steps=5)
prompt = "a red circle at the top left, a blue square at the center"
out = lib.generate_images(model, prompt, settings=settings, seed=3)
image, ctx = out.images[0], out.contexts[0]
out = lib.generate_images(plain, prompt, settings=settings, seed=3)
image_plain, ctx_plain = out.images[0], out.contexts[0]
question = "what is at the top left?"
print(json.dumps({
    "lazy": comfy.ops.disable_weight_init.Linear(3, 2).weight is None,
    "comfy_layers": sum(1 for m in model.modules() if type(m).__module__ == "comfy.ops"),
    "same_image": image.tobytes() == image_plain.tobytes(),
    "answer": str(lib.understand(model, question, context=ctx)[0]),
    "answer_plain": str(lib.understand(plain, question, context=ctx_plain)[0]),
}))
"""
)


@pytest.fixture(scope="module")
def newest_comfy(comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned tree with the newest release's comfy/ops.py laid over it (`overlay.sh`)."""
    overlay = SHARED / "comfyui" / "newest" / "overlay.sh"
    if not overlay.is_file():
        missing(f"{overlay} not found (set BAGEL_SHARED_DIR to the shared folder)")
    dest = tmp_path_factory.mktemp("newest") / "ComfyUI"
    done = subprocess.run(["bash", str(overlay), str(comfy_dir), str(dest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return dest


@pytest.mark.parametrize("aimdo", ["on", "off"])
def test_the_loader_on_the_newest_comfy_ops_gives_the_plain_loads_image_and_answer(
    newest_comfy: Path, aimdo: str
):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run(
        [python, "-c", SCRIPT, str(newest_comfy), str(ROOT), aimdo],
        cwd=newest_comfy, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lazy"] == (aimdo == "on")  # the layers really are weightless until loaded
    assert result["comfy_layers"] > 50  # every weighted layer is one of ComfyUI's
    assert result["same_image"], result
    assert result["answer"] == result["answer_plain"] and result["answer"], result
