"""BAGEL Train LoRA as ComfyUI's executor runs it (no ComfyUI: models/loras is a temporary folder).

What it trains is checked against the library: the node's adapter equals the one `train_lora` makes from
the same examples in a data folder, the LoRA Loader lists it, and the model output carries it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import NODES, bridge, images, lib, run
from safetensors.torch import load_file

from bagel_model.shapes import describe, render, sample_scene
from bagel_model.training.finetune import LoraSettings, train_lora
from bagel_model.training.folder import read_folder

STEPS = 3


@pytest.fixture
def loras(tmp_path, monkeypatch):
    root = tmp_path / "loras"
    root.mkdir()
    monkeypatch.setattr(bridge, "save_folder", lambda name: root if name == "loras" else None)

    def files(name: str) -> dict:
        return (
            {p.relative_to(root).as_posix(): p for p in root.rglob("*.safetensors")}
            if name == "loras"
            else {}
        )

    monkeypatch.setattr(bridge, "model_files", files)
    return root


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(3)
    scenes = [sample_scene(rng, 1, 1) for _ in range(3)]
    pictures = [render(s, 48) for s in scenes]
    return (
        images.to_image(pictures),
        "\n".join(describe(s).replace("blue", "azure") for s in scenes),
        pictures,
    )


@pytest.fixture(scope="module")
def managed():
    return run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME)[0]


def test_node_saves_the_library_adapter_lists_it_and_applies_it(loras, examples, managed, tmp_path):
    batch, text, pictures = examples
    out = run("BAGELTrainLora", model=managed, images=batch, text=text, steps=STEPS, learning_rate=1e-3,
              rank=4, seed=7, name="azure")  # fmt: skip
    adapted, curve, name = out["result"]
    assert name == "azure/adapter_model.safetensors"
    assert out["ui"]["text"][0].startswith(f"saved azure/adapter_model.safetensors: {STEPS} steps")
    assert curve.shape == (1, 256, 512, 3)
    # the same examples as a data folder, through the library, give the same factors
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (picture, caption) in enumerate(zip(pictures, text.splitlines(), strict=True)):
        picture.save(folder / f"x{i}.png")
        (folder / f"x{i}.txt").write_text(caption)
    model = managed.model
    settings = LoraSettings(steps=STEPS, lr=1e-3, rank=4, seed=7)
    train_lora(model, read_folder(folder, model.config), tmp_path / "lib", settings)
    node, library = (
        load_file(str(loras / name)),
        load_file(str(tmp_path / "lib" / "adapter_model.safetensors")),
    )
    assert node.keys() == library.keys() and all(torch.equal(node[k], library[k]) for k in node)
    assert NODES["BAGELLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0] == [name]
    # the output model draws with the adapter: as the LoRA Loader's output does
    (loaded,) = run("BAGELLoraLoader", model=managed, lora_name=name, strength=1.0)
    prompt = {"prompt": text.splitlines()[0], "seed": 1, "steps": 3}
    a = run("BAGELTextToImage", model=adapted, **prompt)["result"][0]
    b = run("BAGELTextToImage", model=loaded, **prompt)["result"][0]
    base = run("BAGELTextToImage", model=managed, **prompt)["result"][0]
    assert torch.equal(a, b) and not torch.equal(a, base)


def test_a_second_run_keeps_the_first_adapter(loras, examples, managed):
    batch, text, _ = examples
    kw = {"model": managed, "images": batch, "text": text, "steps": 1, "rank": 4, "name": "style"}
    first = run("BAGELTrainLora", **kw)["result"][2]
    second = run("BAGELTrainLora", **kw)["result"][2]
    assert (first, second) == ("style/adapter_model.safetensors", "style_2/adapter_model.safetensors")
    a, b = load_file(str(loras / first)), load_file(str(loras / second))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same inputs: the same adapter


def test_edits_train_from_target_images(loras, examples, managed):
    batch, _, _ = examples
    flipped = torch.flip(batch, dims=[2])
    out = run("BAGELTrainLora", model=managed, images=batch, target_images=flipped, text="mirror the picture",
              steps=1, rank=4, name="mirror")  # fmt: skip
    assert (loras / "mirror" / "adapter_config.json").is_file() and np.isfinite(
        out["result"][1].numpy()
    ).all()


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"text": "one\ntwo"}, "3 images and 2 lines of captions: write one line per image"),
        ({"text": "a\n\nb"}, r"line\(s\) 2 of captions are empty"),
        ({"name": "../escape"}, "name '../escape' must be a folder name"),
        ({"target_images": "short"}, "3 images and 1 target_images"),
    ],
)
def test_bad_inputs_are_named_before_training(loras, examples, managed, inputs, message):
    batch, text, _ = examples
    if inputs.get("target_images") == "short":
        inputs = {"target_images": batch[:1]}
    with pytest.raises(ValueError, match=message):
        run("BAGELTrainLora", **{"model": managed, "images": batch, "text": text, "steps": 1, **inputs})
    assert not any(loras.iterdir())


def test_cancel_keeps_what_was_trained(loras, examples, managed, monkeypatch):
    batch, text, _ = examples
    calls = []

    def cancel_at_second(self, step, total, payload):
        calls.append(step)
        if step == 2:
            raise InterruptedError("cancelled")

    monkeypatch.setattr(bridge.Progress, "__call__", cancel_at_second)
    with pytest.raises(InterruptedError):
        run("BAGELTrainLora", model=managed, images=batch, text=text, steps=5, rank=4, name="cut")
    state = torch.load(loras / "cut" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and calls == [1, 2]
    lib.lora.read(loras / "cut")


def test_a_model_loaded_and_trained_under_inference_mode_trains_as_in_comfyui(loras, examples):
    """ComfyUI runs every node under torch.inference_mode(): the Loader's tensors are inference tensors,
    which autograd refuses to save; the node trains anyway, and its model draws as before."""
    batch, text, _ = examples
    with torch.inference_mode():
        (managed,) = run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME)
        assert managed.model.net.vae2llm.weight.is_inference()
        before = run("BAGELTextToImage", model=managed, prompt="a red circle at the top", steps=3)["result"][
            0
        ]
        out = run("BAGELTrainLora", model=managed, images=batch, text=text, steps=2, rank=4, name="inf")
        after = run("BAGELTextToImage", model=managed, prompt="a red circle at the top", steps=3)["result"][0]
    assert out["result"][2] == "inf/adapter_model.safetensors" and torch.equal(before, after)
