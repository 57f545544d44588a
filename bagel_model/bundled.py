"""Where the default model lives.

Until a trained model ships inside the package (`bagel_model/bundled/`), the default is the tiny random
checkpoint of `tiny.py`, written once to a cache folder: every workflow and command runs with no download.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .tiny import TINY_CONFIG, make_tiny

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_NAME = "bagel-tiny (bundled)"


def cache_dir() -> Path:
    root = os.environ.get("BAGEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bagel_model")
    return Path(root)


def default_model_dir() -> Path:
    """The bundled model's folder, or a tiny random one written on first use."""
    if (BUNDLED_DIR / "ema.safetensors").is_file():
        return BUNDLED_DIR
    version = hashlib.sha1(repr(TINY_CONFIG).encode()).hexdigest()[:8]  # a config change writes a new folder
    folder = cache_dir() / f"tiny-random-{version}"
    if not (folder / "ema.safetensors").is_file():
        make_tiny(folder, seed=0)
    return folder
