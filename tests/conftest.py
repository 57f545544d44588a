"""Fixtures shared by the test files: the official tiny references (a checkpoint written by the official
code, its input image, the official inferencer's outputs), the official 7B key tables, a checkout of the
official code, a tiny random checkpoint of ours, each model loaded once per session (float32 on CPU), a test
picture and a pixel reader.

The references and key tables a fresh clone needs are in tests/fixtures. The shared folder
($BAGEL_SHARED_DIR, or `shared/` beside the repository root) adds a second, larger official reference where
it is present: every test of a reference runs on each. The official checkout is $BAGEL_OFFICIAL_DIR; tests
that need it are skipped with the reason when it is absent. The loaded models are shared by every test of
the session: a test that changes weights must work on a copy (`copy.deepcopy(model.net)`).

Helpers are fixtures, not imports: tests/comfyui/ has a conftest of its own, so `from conftest import`
would find whichever of the two was imported last.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import bagel_model
from bagel_model.model import BagelModel
from bagel_model.tiny import make_tiny

# Every model here is toy-sized: thread hand-offs cost more than they save (4x slower with 2 threads here).
torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DIR = Path(os.environ.get("BAGEL_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))

# The official references: the small one in the repository always (a fresh clone runs every test of a
# reference), and the shared one too where it is present (the official image limits: a 512x688 edit).
PARITY_REFERENCES = {"in_repo": FIXTURES / "official_tiny"} | (
    {"shared": SHARED_DIR / "reference" / "official_tiny"}
    if (SHARED_DIR / "reference" / "official_tiny" / "model").is_dir()
    else {}
)


def _key_table(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(path.read_text())["tensors"].items()}


@pytest.fixture(scope="session", params=list(PARITY_REFERENCES))
def reference_name(request: pytest.FixtureRequest) -> str:
    """Which official tiny reference a test runs on ("in_repo", "shared"): numbers pinned from the official
    code are kept per reference."""
    return request.param


@pytest.fixture(scope="session")
def parity_reference(reference_name: str) -> Path:
    """An official tiny reference: `model/` (written by the official classes) and `ref/` (the official
    inferencer's outputs on it, `results.json`, their input image and initial noise)."""
    return PARITY_REFERENCES[reference_name]


@pytest.fixture(scope="session")
def official_tiny(parity_reference: Path) -> Path:
    """The reference's random checkpoint, in the official layout (written by the official BAGEL code)."""
    return parity_reference / "model"


@pytest.fixture(scope="session")
def input_png(parity_reference: Path) -> Path:
    """The reference's input image (200x150), the one its recorded outputs were made from."""
    return parity_reference / "ref" / "input.png"


@pytest.fixture(scope="session")
def official_model(official_tiny: Path) -> BagelModel:
    return bagel_model.load(official_tiny)


@pytest.fixture(scope="session")
def official_7b_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of the released BAGEL-7B-MoT `ema.safetensors`: name -> shape."""
    return _key_table(FIXTURES / "official_keys" / "bagel_ema_keys.json")


@pytest.fixture(scope="session")
def official_ae_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of the released `ae.safetensors` (the FLUX autoencoder): name -> shape."""
    return _key_table(FIXTURES / "official_keys" / "bagel_ae_keys.json")


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """A checkout of the official BAGEL repository ($BAGEL_OFFICIAL_DIR), for in-process comparisons."""
    root = os.environ.get("BAGEL_OFFICIAL_DIR")
    if not root:
        pytest.skip("BAGEL_OFFICIAL_DIR is not set (a checkout of the official BAGEL repo)")
    if not (Path(root) / "modeling").is_dir():
        pytest.skip(f"BAGEL_OFFICIAL_DIR {root} is not a checkout of the official BAGEL repo (no modeling/)")
    return Path(root)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint of ours (seed 0), written once per session. Treat it as read-only."""
    return make_tiny(tmp_path_factory.mktemp("tiny_bagel"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> BagelModel:
    return bagel_model.load(tiny_dir)


@pytest.fixture(scope="session")
def picture() -> Image.Image:
    """A 64x64 test picture: a red circle at the top left and a blue rectangle right of center."""
    im = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(im)
    draw.ellipse((4, 4, 28, 28), fill="red")
    draw.rectangle((30, 30, 56, 50), fill="blue")
    return im


def _pixels(image: Image.Image | Path | str) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.int16)
    with Image.open(image) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="session")
def pixels() -> Callable[[Image.Image | Path | str], np.ndarray]:
    """Reads an image, or an image file, as an (h, w, 3) int16 array (differences of two can be negative)."""
    return _pixels


def with_window(model: BagelModel, positions: int) -> BagelModel:
    """`model`'s weights (shared, not copied) behind a RoPE window of `positions`."""
    cfg = model.config
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_position_embeddings=positions))
    return BagelModel(model.net, model.vae, model.tokenizer, cfg, model.source)


@pytest.fixture(scope="session")
def windowed() -> Callable[[BagelModel, int], BagelModel]:
    """`with_window` as a fixture (test files cannot import this conftest by name: tests/comfyui has one)."""
    return with_window


@pytest.fixture
def count_passes(tiny_model):
    """Count decoder passes (calls of model.net.forward, recording each query's length) from now on."""
    net, calls = tiny_model.net, []
    original = net.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    net.forward = counting  # an instance attribute shadows the method until deleted
    yield calls
    del net.forward
