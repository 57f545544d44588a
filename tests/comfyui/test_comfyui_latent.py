"""BAGEL's LATENT output is ComfyUI's own FLUX latent, checked against ComfyUI's code (not a copy of it).

The nodes hand ComfyUI `vae.to_raw(latents)` (nodes/latents.py): the autoencoder's raw latent space, which
ComfyUI's VAE Decode decodes as it is and its FLUX latent format scales for sampling. Two facts make that
interop exact for BAGEL-7B-MoT, whose autoencoder is FLUX's:
- ComfyUI's `latent_formats.Flux` scales raw latents into the sampling space with BAGEL's own factors
  (0.3611, 0.1159): its `process_in` is our `from_raw`.
- ComfyUI's VAE loader recognizes an autoencoder in the official ae.safetensors layout as the FLUX one, and
  its VAE decode of our raw latent gives our decode of the scaled latent. ComfyUI builds that autoencoder
  with FLUX's fixed channel counts (128, multipliers 1 2 4 4), so the check writes a full-size one with
  random weights (84M parameters, about 340 MB in a temporary folder); a tiny one would not load.

ComfyUI runs in its own interpreter ($COMFYUI_PYTHON, in $COMFYUI_DIR), as a user's would; no server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from bagel_model.config import VAEConfig
from bagel_model.layers.vae import AutoEncoder

# Runs inside ComfyUI: argv = [what, input .pt, output .pt, (ae.safetensors)]; prints a JSON line.
COMFY_SIDE = """
import json, sys, torch
import comfy.cli_args
comfy.cli_args.args.cpu = True
what, source, target = sys.argv[1:4]
if what == "format":
    import comfy.latent_formats
    flux = comfy.latent_formats.Flux()
    torch.save(flux.process_in(torch.load(source)), target)
    facts = {"scale": flux.scale_factor, "shift": flux.shift_factor, "channels": flux.latent_channels}
    print(json.dumps(facts))
else:
    import comfy.sd, comfy.utils
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(sys.argv[4]))
    torch.save(vae.decode(torch.load(source)).float(), target)
    print(json.dumps({"latent_channels": vae.latent_channels, "dtype": str(vae.vae_dtype)}))
"""


def in_comfyui(
    comfy: Path, tmp_path: Path, what: str, tensor: torch.Tensor, *extra: str
) -> tuple[dict, torch.Tensor]:
    """Run COMFY_SIDE's `what` on `tensor` in ComfyUI: its JSON facts and its output tensor."""
    source, target = tmp_path / f"{what}_in.pt", tmp_path / f"{what}_out.pt"
    torch.save(tensor, source)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run(
        [python, "-c", COMFY_SIDE, what, str(source), str(target), *extra],
        cwd=comfy, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(target)


def test_comfyuis_flux_latent_format_is_our_raw_conversion(comfy_dir, tmp_path):
    official = VAEConfig()  # BAGEL-7B-MoT's autoencoder parameters (the official load_ae's)
    raw = torch.randn(2, official.z_channels, 8, 12, generator=torch.Generator().manual_seed(0))
    facts, scaled = in_comfyui(comfy_dir, tmp_path, "format", raw)
    assert facts == {"scale": official.scale_factor, "shift": official.shift_factor, "channels": 16}
    ours = AutoEncoder.__new__(AutoEncoder)  # from_raw reads the config only: no 84M weights needed here
    torch.nn.Module.__init__(ours)
    ours.cfg = official
    assert torch.allclose(ours.from_raw(raw), scaled, atol=1e-6)
    assert torch.allclose(ours.to_raw(scaled), raw, atol=1e-5)


def test_comfyuis_vae_decode_of_our_latent_is_our_decode(comfy_dir, tmp_path):
    torch.manual_seed(0)
    ae = AutoEncoder(VAEConfig()).eval()  # the official layout and sizes, random weights
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(path))
    scaled = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = ((ae.decode(scaled) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    facts, theirs = in_comfyui(comfy_dir, tmp_path, "decode", ae.to_raw(scaled), str(path))
    path.unlink()
    assert facts == {"latent_channels": 16, "dtype": "torch.float32"}
    assert theirs.shape == ours.shape == (1, 64, 64, 3)
    inside = ((ours > 0.01) & (ours < 0.99)).float().mean()
    assert inside > 0.2, "random weights saturated the image: the comparison would say little"
    assert (theirs - ours).abs().max() < 1e-4
