"""A LoRA data folder: the layout people already keep (kohya / ai-toolkit style), read into training plans.

| files                                        | example       | plan (as the task lays out its context) |
|----------------------------------------------|---------------|-----------------------------------------|
| `name.png` + `name.txt` (the caption)        | text-to-image | caption, target                         |
| `name_src.png` + `name_tgt.png` + `name.txt` | edit          | VAE(src), ViT(src), instruction, target |
| `name.png` + `name.qa.json`                  | understanding | ViT(image), question, answer (loss)...  |

`name.qa.json` holds `{"question": ..., "answer": ...}` or a list of them (turns of one chat about the
image). Images may be .png, .jpg, .jpeg or .webp; text is UTF-8. Every image is opened and every text read
here, before any training: all the bad examples are reported together, each by its file, so a folder is
fixed in one pass rather than one crash at a time.

Pictures are resized as inference resizes them (the VAE rule with the training `resolution` as the long
side's limit, then the ViT rule of that), and an edit's target is shown at its source's size, which is the
size an edit draws at. `FolderBank` is the `data.ImageBank` of such files: it encodes each picture once
with the model's autoencoder and keeps its tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..config import BagelConfig, ImageLimits
from ..images import flattened_position_ids, patchify, resize, resize_dims, to_rgb, to_tensor
from ..layers.vae import AutoEncoder
from ..tokenizer import check_text
from .data import Plan, Target, Text, Vae, Vit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
QA_SUFFIX = ".qa.json"
SOURCE_TAG, TARGET_TAG = "_src", "_tgt"
_SHOWN = 8  # problems listed before "and N more"


class DataError(ValueError):
    """A data folder holds examples that cannot be trained on; the message lists each file and why."""


@dataclass(frozen=True)
class ImageFile:
    """A user's picture as a plan item shows it: the file and the (width, height) it is shown at."""

    path: Path
    size: tuple[int, int]


@dataclass(frozen=True)
class Examples:
    """What a folder holds: one plan per example, and how many of each kind."""

    plans: tuple[Plan, ...]
    counts: dict[str, int]

    @property
    def has_understanding(self) -> bool:
        return self.counts.get("understand", 0) > 0


def training_limits(cfg: BagelConfig, resolution: int) -> ImageLimits:
    """The model's VAE resize rule with the long side kept within `resolution`."""
    vae = cfg.inference.vae_limits
    return replace(vae, max_size=min(resolution, vae.max_size), min_size=min(resolution, vae.min_size))


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def _text(path: Path) -> str:
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError("is empty")
    return check_text(text, path.name)


def _turns(path: Path) -> list[tuple[str, str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data if isinstance(data, list) else [data]
    turns = []
    for item in items:
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) for k in ("question", "answer")
        ):
            raise ValueError('needs {"question": "...", "answer": "..."} or a list of them')
        question, answer = item["question"].strip(), item["answer"].strip()
        if not question or not answer:
            raise ValueError("has an empty question or answer")
        turns.append((check_text(question, path.name), check_text(answer, path.name)))
    if not turns:
        raise ValueError("holds no question")
    return turns


class _Reader:
    """Collects examples and problems while the folder's files are matched up."""

    def __init__(self, limits: ImageLimits):
        self.limits = limits
        self.plans: list[Plan] = []
        self.problems: list[str] = []

    def fail(self, path: Path, why: str) -> None:
        self.problems.append(f"{path.name}: {why}")

    def size(self, path: Path) -> tuple[int, int] | None:
        """The (width, height) of the image file, or None (reported) when it does not open."""
        try:
            return _open(path).size
        except (OSError, UnidentifiedImageError, ValueError) as e:
            self.fail(path, f"cannot be read as an image ({e})")
            return None

    def picture(self, path: Path) -> ImageFile | None:
        """The file as shown after the training resize, or None (reported)."""
        size = self.size(path)
        return None if size is None else ImageFile(path, resize_dims(*size, self.limits))

    def read(self, path: Path, parse) -> object | None:
        try:
            return parse(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            self.fail(path, str(e) if isinstance(e, ValueError) else f"cannot be read ({e})")
            return None

    def t2i(self, image: Path, caption: Path) -> None:
        picture, text = self.picture(image), self.read(caption, _text)
        if picture and text:
            self.plans.append(Plan("t2i", (Text(text, cfg=True), Target(picture))))

    def edit(self, source: Path, target: Path, instruction: Path) -> None:
        """The target is shown at its source's size: the size an edit draws at."""
        a, b, text = self.size(source), self.size(target), self.read(instruction, _text)
        if not (a and b and text):
            return
        (wa, ha), (wb, hb) = a, b
        if abs(wa / ha - wb / hb) > 0.02:
            self.fail(
                target,
                f"is {wb}x{hb} but its source {source.name} is {wa}x{ha}: an edit pair needs one shape",
            )
            return
        shown = resize_dims(wa, ha, self.limits)
        before, after = ImageFile(source, shown), ImageFile(target, shown)
        self.plans.append(
            Plan("edit", (Vae(before, cfg=True), Vit(before, cfg=True), Text(text, cfg=True), Target(after)))
        )

    def understand(self, image: Path, qa: Path) -> None:
        picture, turns = self.picture(image), self.read(qa, _turns)
        if picture and turns:
            items: list = [Vit(picture)]
            for question, answer in turns:
                items += [Text(question), Text(answer, loss=True)]
            self.plans.append(Plan("understand", tuple(items)))


def _by_stem(files: Iterable[Path]) -> dict[str, dict[str, Path]]:
    """stem -> {suffix: path} with ".qa.json" as one suffix."""
    found: dict[str, dict[str, Path]] = {}
    for path in files:
        name = path.name
        suffix = QA_SUFFIX if name.lower().endswith(QA_SUFFIX) else path.suffix.lower()
        found.setdefault(name[: len(name) - len(suffix)], {})[suffix] = path
    return found


def read_folder(folder: Path | str, cfg: BagelConfig, resolution: int = 512) -> Examples:
    """The examples of a data folder (see the module docstring), or a DataError naming every bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stems = _by_stem(files)
    reader = _Reader(training_limits(cfg, resolution))
    images = {
        stem: next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None) for stem, parts in stems.items()
    }
    used: set[str] = set()
    for stem, image in images.items():
        if stem.endswith(SOURCE_TAG) and image is not None:
            base = stem[: -len(SOURCE_TAG)]
            target, instruction = images.get(base + TARGET_TAG), stems.get(base, {}).get(CAPTION_SUFFIX)
            if target is None:
                reader.fail(image, f"has no target image {base}{TARGET_TAG}.png beside it")
            elif instruction is None:
                reader.fail(image, f"has no instruction {base}{CAPTION_SUFFIX} beside it")
            else:
                reader.edit(image, target, instruction)
            used |= {stem, base + TARGET_TAG, base}
    for stem, parts in stems.items():
        if stem in used:
            continue
        image, caption, qa = images[stem], parts.get(CAPTION_SUFFIX), parts.get(QA_SUFFIX)
        if stem.endswith(TARGET_TAG) and image is not None:
            reader.fail(
                image, f"is an edit target without its source {stem[: -len(TARGET_TAG)]}{SOURCE_TAG}.png"
            )
        elif image is None:
            text = caption or qa
            if text is not None:
                reader.fail(text, f"has no image {stem}.png beside it")
        elif caption is None and qa is None:
            reader.fail(
                image, f"has no caption {stem}{CAPTION_SUFFIX} or questions {stem}{QA_SUFFIX} beside it"
            )
        else:
            if caption is not None:
                reader.t2i(image, caption)
            if qa is not None:
                reader.understand(image, qa)
    if reader.problems:
        more = len(reader.problems) - _SHOWN
        listed = "\n  ".join(reader.problems[:_SHOWN]) + (f"\n  and {more} more" if more > 0 else "")
        raise DataError(
            f"{folder} has {len(reader.problems)} bad example(s); fix or remove them:\n  {listed}"
        )
    if not reader.plans:
        raise DataError(
            f"{folder} holds no examples: put name.png + name.txt (a caption), name_src.png + name_tgt.png + "
            "name.txt (an edit), or name.png + name.qa.json (questions) there"
        )
    counts: dict[str, int] = {}
    for plan in reader.plans:
        counts[plan.task] = counts.get(plan.task, 0) + 1
    return Examples(tuple(reader.plans), counts)


class FolderBank:
    """`data.ImageBank` for `ImageFile`s: ViT patches and clean latent tokens of each picture, made once."""

    def __init__(self, ae: AutoEncoder, cfg: BagelConfig):
        self.ae, self.cfg = ae, cfg
        self._vit: dict[ImageFile, tuple[torch.Tensor, torch.Tensor]] = {}
        self._latent: dict[ImageFile, tuple[torch.Tensor, torch.Tensor]] = {}

    def key(self, picture: ImageFile, context: bool) -> ImageFile:
        return picture  # a picture is shown the same way as context and as target

    def _vae_image(self, picture: ImageFile) -> Image.Image:
        image = _open(picture.path)
        return image if image.size == picture.size else image.resize(picture.size, Image.Resampling.BICUBIC)

    def vit(self, picture: ImageFile) -> tuple[torch.Tensor, torch.Tensor]:
        if picture not in self._vit:
            pixels = to_tensor(resize(self._vae_image(picture), self.cfg.inference.vit_limits))
            p = self.cfg.vit.patch_size
            pos = flattened_position_ids(
                pixels.shape[1] // p, pixels.shape[2] // p, self.cfg.vit_max_num_patch_per_side
            )
            self._vit[picture] = (patchify(pixels, p), pos)
        return self._vit[picture]

    @torch.no_grad()
    def prefetch(self, pictures: list[ImageFile]) -> None:
        for picture in dict.fromkeys(pictures):
            if picture in self._latent:
                continue
            pixels = to_tensor(self._vae_image(picture)).unsqueeze(0).to(self.ae.device, self.ae.dtype)
            latent = self.ae.encode(pixels)[0].float().cpu()  # the posterior mean, as contexts encode
            down = self.cfg.latent_downsample
            w, h = picture.size
            pos = flattened_position_ids(h // down, w // down, self.cfg.max_latent_size)
            self._latent[picture] = (patchify(latent, self.cfg.latent_patch_size), pos)

    def latent(self, picture: ImageFile, context: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch([picture])
        return self._latent[picture]
