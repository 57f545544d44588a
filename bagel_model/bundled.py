"""Where the default model lives: `bagel_model/bundled/`, a tiny BAGEL trained on the shapes world.

It ships inside the package (16 MB, official folder layout, model card in its README.md) so that every
workflow and command runs on any CPU with no download, and its outputs can be graded by the shapes scorer.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_NAME = "bagel-tiny (bundled)"


def default_model_dir() -> Path:
    """The bundled model's folder; an incomplete install is reported, not silently replaced."""
    if not (BUNDLED_DIR / "ema.safetensors").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from {BUNDLED_DIR} (ema.safetensors not found): reinstall the "
            "extension, or pass a model folder explicitly"
        )
    return BUNDLED_DIR
