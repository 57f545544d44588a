"""BAGEL Train LoRA: teach a loaded BAGEL a concept, style or edit from a batch of images in the graph.

The node lays its inputs out as a `train-lora` data folder (image + caption, or source + target +
instruction) in a temporary directory and trains with the library (`bagel_model.training.finetune`), so
the node, the CLI and the library read examples by the same rules and give the same adapter for the same
seed. The adapter is saved under ComfyUI's `models/loras/<name>/` (PEFT format: the LoRA Loader lists it
at once), every `save_every` steps and when the run ends or is cancelled, so Cancel keeps what was
trained. Outputs: the model with the adapter applied (ComfyUI's LoRA patches, as the LoRA Loader gives
it) and the loss curve.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from ..bagel_model import lora
from ..bagel_model.quant import is_quantized
from ..bagel_model.training.finetune import LoraSettings, train_lora
from ..bagel_model.training.folder import CAPTION_SUFFIX, SOURCE_TAG, TARGET_TAG, read_folder
from ..bagel_model.training.plot import loss_curve
from . import comfy_bridge
from .images import to_image, to_pils
from .lora import LORA_FOLDER
from .sockets import CATEGORY, MODEL, library_seed, model_input, node_id_input, seed_input, widget

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _lines(text: str, images: int, what: str) -> list[str]:
    """One text per image: a line each, or one line for all of them."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) == 1:
        lines = lines * images
    if len(lines) != images:
        raise ValueError(
            f"{images} images and {len(lines)} lines of {what}: write one line per image, in batch order, "
            "or a single line for all of them"
        )
    empty = [str(i + 1) for i, line in enumerate(lines) if not line]
    if empty:
        raise ValueError(f"line(s) {', '.join(empty)} of {what} are empty")
    return lines


def write_examples(folder: Path, images, text: str, targets=None) -> None:
    """The node's inputs as a data folder: captions for `images`, or edits of them into `targets`."""
    sources = to_pils(images, "images")
    if targets is None:
        for i, (image, caption) in enumerate(
            zip(sources, _lines(text, len(sources), "captions"), strict=True)
        ):
            image.save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}{CAPTION_SUFFIX}").write_text(caption, encoding="utf-8")
        return
    after = to_pils(targets, "target_images")
    if len(after) != len(sources):
        raise ValueError(f"{len(sources)} images and {len(after)} target_images: give one target per image")
    for i, (a, b, instruction) in enumerate(zip(sources, after, _lines(text, len(sources), "instructions"),
                                                strict=True)):  # fmt: skip
        a.save(folder / f"{i:04d}{SOURCE_TAG}.png")
        b.save(folder / f"{i:04d}{TARGET_TAG}.png")
        (folder / f"{i:04d}{CAPTION_SUFFIX}").write_text(instruction, encoding="utf-8")


def adapter_folder(name: str) -> Path:
    """models/loras/<name>, or <name>_2, <name>_3, ... when it exists: a new run never overwrites an
    adapter trained before."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must be a folder name: letters, digits, '_', '-' and '.'")
    root = comfy_bridge.save_folder(LORA_FOLDER)
    if root is None:
        raise RuntimeError("BAGEL Train LoRA saves into ComfyUI's models/loras: run it inside ComfyUI")
    folder, k = root / name, 1
    while folder.exists():
        k += 1
        folder = root / f"{name}_{k}"
    return folder


class BAGELTrainLora:
    DESCRIPTION = (
        "Trains a LoRA adapter on a batch of images with captions (text-to-image), or images, target images "
        "and instructions (edits), saves it under models/loras/<name>/ for the BAGEL LoRA node, and gives "
        "the model with it applied. Cancel stops and keeps what was trained; the same seed and inputs give "
        "the same adapter."
    )
    CATEGORY = f"{CATEGORY}/train"
    RETURN_TYPES = (MODEL, "IMAGE", "STRING")
    RETURN_NAMES = ("model", "loss", "lora_name")
    OUTPUT_TOOLTIPS = (
        "The model with the new adapter applied (contexts of the input model cannot be continued with it).",
        "The loss per step and its running mean.",
        "The adapter's name in the BAGEL LoRA node's list.",
    )
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        d = LoraSettings()
        return {
            "required": {
                "model": model_input(),
                "images": widget("IMAGE", "The training images (a batch): what to draw, or what to edit."),
                "text": widget(
                    "STRING", "One caption (or, with target_images, one edit instruction) per image, a line "
                    "each in batch order; a single line is used for every image.", multiline=True,
                    default="a photo of sks",
                ),
                "steps": widget(
                    "INT", "Optimizer steps (one image each).", default=d.steps, min=1, max=100_000
                ),
                "learning_rate": widget(
                    "FLOAT", "AdamW learning rate of the LoRA factors.", default=d.lr, min=1e-6, max=1e-1,
                    step=1e-5, round=False,
                ),
                "rank": widget("INT", "LoRA rank (alpha = rank).", default=d.rank, min=1, max=256),
                "seed": seed_input(),
                "name": widget(
                    "STRING", "Folder name of the adapter under models/loras/.", default="bagel_lora"
                ),
            },
            "optional": {
                "target_images": widget(
                    "IMAGE", "Optional: what each image should become; then the text is edit instructions."
                ),
            },
            "hidden": node_id_input(),
        }  # fmt: skip

    def train(self, model, images, text, steps, learning_rate, rank, seed, name, target_images=None,
              unique_id=None):  # fmt: skip
        bagel = model.ready()
        if is_quantized(bagel):
            raise lora.LoraError(
                "BAGEL Train LoRA needs a model loaded with weights native (the adapter is applied to it "
                "afterwards); train on fp8 / nf4 weights with `python -m bagel_model train-lora --weights`"
            )
        folder = adapter_folder(name)
        settings = LoraSettings(steps=steps, lr=learning_rate, rank=rank, seed=library_seed(seed))
        live = comfy_bridge.LiveText(unique_id, comfy_bridge.Progress())

        def report(r) -> None:
            live(r.step, r.steps, None)
            minutes, seconds = divmod(int(r.seconds_left), 60)
            live.update(f"step {r.step}/{r.steps}  loss {r.loss:.4f}  {minutes}m{seconds:02d}s left")

        with tempfile.TemporaryDirectory(prefix="bagel_lora_") as data:
            write_examples(Path(data), images, text, target_images)
            examples = read_folder(data, bagel.config, settings.resolution)
            comfy_bridge.make_trainable(bagel)
            with torch.inference_mode(False):  # ComfyUI runs nodes under inference mode
                result = train_lora(bagel, examples, folder, settings, callback=report)
        adapted = comfy_bridge.with_lora(model, lora.read(result.adapter), 1.0)
        losses = [row["loss"] for row in result.history]
        lora_name = result.adapter.relative_to(folder.parent).as_posix()
        summary = f"saved {lora_name}: {result.steps} steps, last loss {losses[-1]:.4f}"
        live.finish(summary)
        return {"ui": {"text": [summary]}, "result": (adapted, to_image([loss_curve(losses)]), lora_name)}
