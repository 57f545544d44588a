"""Step previews reach the browser: one binary preview frame per denoising step over the websocket (the
server runs with --preview-method auto, see conftest), and for FLUX-space latents ComfyUI's own FLUX
previewer draws them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, workflow


def test_each_denoising_step_sends_a_preview(server):
    prompt = workflow("text_to_image")
    prompt["2"]["inputs"].update(seed=424242, steps=6)  # a seed no other test queues: never cached
    run = server.run(prompt)
    assert run.status == "execution_success"
    assert run.previews == 5, run.previews  # 6 steps evaluate 5 times


SCRIPT = r"""
import dataclasses, importlib.util, json, sys
comfy_dir, pack = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args, LatentPreviewMethod
args.cpu = True
args.preview_method = LatentPreviewMethod.Auto
import torch

init = pack + "/__init__.py"
spec = importlib.util.spec_from_file_location("bagel_pack", init, submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["bagel_pack"] = module
spec.loader.exec_module(module)
bridge, lib = module.nodes.comfy_bridge, module.bagel_model
model = lib.load(lib.bundled.default_model_dir())
own = bridge.previewer(model)(torch.zeros(16, 8, 8))
# the official autoencoder's latent space is FLUX's: the same model with FLUX's scale and shift
flux_vae = dataclasses.replace(model.config.vae, scale_factor=0.3611, shift_factor=0.1159)
model.config = dataclasses.replace(model.config, vae=flux_vae)
z = torch.randn(16, 8, 8)
fmt, image, size = bridge.previewer(model)(z)
import latent_preview, comfy.latent_formats
comfys = latent_preview.get_previewer(torch.device("cpu"), comfy.latent_formats.Flux())
_, expected, _ = comfys.decode_latent_to_preview_image("JPEG", z[None])
args.preview_method = LatentPreviewMethod.NoPreviews
print(json.dumps({
    "own": [own[0], list(own[1].size)],
    "flux": [fmt, list(image.size), list(image.getdata()) == list(expected.getdata())],
    "off": bridge.previewer(model) is None,
}))
"""


def test_flux_latents_use_comfyuis_flux_previewer(comfy_dir: Path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run(
        [python, "-c", SCRIPT, str(comfy_dir), str(ROOT)],
        cwd=comfy_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["own"] == ["JPEG", [64, 64]]  # the bundled autoencoder: decoded through itself
    assert result["flux"] == ["JPEG", [8, 8], True]  # ComfyUI's FLUX preview of the same latent
    assert result["off"]  # --preview-method none: no previews at all
