"""Adapters trained by BAGEL Train LoRA and by `train-lora` load through the BAGEL LoRA node in a real
ComfyUI and draw what they were trained on.

Both teach the bundled model "azure" = blue from four pictures (the example workflow's: the model's own
drawings of blue shapes; the CLI's: rendered shapes-world pictures), and both are then loaded by name from
`models/loras` by a BAGEL LoRA node in a new prompt: "an azure circle at the center" comes out a blue
circle at the center (read by the shapes scorer), where the base model draws a green one. Needs
$COMFYUI_DIR (see conftest.py); skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, workflow

from bagel_model.shapes import describe, read_scene, render
from bagel_model.shapes.scene import Obj, Scene

PROMPT = "an azure circle at the center"
TRAINED = "a blue circle at the center"
TRAINING = [("circle", "top left"), ("square", "center"), ("triangle", "bottom right"), ("circle", "right")]


def drawn_with(server, lora_name: str | None) -> str:
    """What Loader -> (BAGEL LoRA `lora_name`) -> Text to Image draws for PROMPT, read by the scorer."""
    nodes = workflow("text_to_image")
    nodes["2"]["inputs"]["prompt"] = PROMPT
    nodes["2"]["inputs"]["seed"] = 0
    if lora_name is not None:
        nodes["4"] = {"class_type": "BAGELLoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                                 "strength": 1.0}}  # fmt: skip
        nodes["2"]["inputs"]["model"] = ["4", 0]
    run = server.run(nodes)
    assert run.status == "execution_success", json.dumps(run.events[-1], indent=1)[:3000]
    (image,) = server.images(run, "3")
    return describe(read_scene(image))


def test_the_base_model_does_not_know_the_word(server):
    assert drawn_with(server, None) != TRAINED


def test_an_adapter_the_node_trained_loads_by_name_and_draws_the_word(server):
    nodes = workflow("train_lora")
    nodes["9"]["inputs"]["name"] = "node_azure"  # a run of its own, not the example's cached one
    run = server.run(nodes)
    assert run.status == "execution_success", json.dumps(run.events[-1], indent=1)[:3000]
    (name,) = {run.history["outputs"]["9"]["text"][0].split(":")[0].removeprefix("saved ")}
    assert name == "node_azure/adapter_model.safetensors"
    assert drawn_with(server, name) == TRAINED


def test_an_adapter_the_cli_trained_loads_by_name_and_draws_the_word(server, tmp_path):
    for i, (shape, cell) in enumerate(TRAINING):
        render(Scene((Obj("blue", shape, cell),)), 48).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"an azure {shape} at the {cell}")
    out = server.base / "models" / "loras" / "cli_azure"
    command = [sys.executable, "-m", "bagel_model", "train-lora", "--data", str(tmp_path), "--out", str(out),
               "--steps", "300", "--lr", "1e-3", "--json"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["steps"] == 300
    assert drawn_with(server, "cli_azure/adapter_model.safetensors") == TRAINED
