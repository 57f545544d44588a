"""Session fixtures shared by the test files: the shared reference folder, the official tiny checkpoint,
and a tiny random checkpoint of ours, each loaded once per session (float32 on CPU).

The shared folder is $BAGEL_SHARED_DIR, or `shared/` beside the repository root; tests that need it are
skipped with the reason when it is absent. The loaded models are shared by every test of the session:
a test that changes weights must work on a copy (`copy.deepcopy(model.net)`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import bagel_model
from bagel_model.model import BagelModel
from bagel_model.tiny import make_tiny

# Every model here is toy-sized: thread hand-offs cost more than they save (4x slower with 2 threads here).
torch.set_num_threads(1)

SHARED_DIR = Path(os.environ.get("BAGEL_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (set BAGEL_SHARED_DIR to the shared reference directory)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference directory ($BAGEL_SHARED_DIR, default `../shared` next to the repo)."""
    return _need(SHARED_DIR)


@pytest.fixture(scope="session")
def official_tiny(shared_dir: Path) -> Path:
    """A tiny random checkpoint written by the official BAGEL code (`reference/official_tiny/model`)."""
    return _need(shared_dir / "reference" / "official_tiny" / "model")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint of ours (seed 0), written once per session. Treat it as read-only."""
    return make_tiny(tmp_path_factory.mktemp("tiny_bagel"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> BagelModel:
    return bagel_model.load(tiny_dir)


@pytest.fixture(scope="session")
def official_model(official_tiny: Path) -> BagelModel:
    return bagel_model.load(official_tiny)
