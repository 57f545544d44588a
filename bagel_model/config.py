"""Configuration dataclasses for BAGEL, read from a model folder's JSON files (or a single file's metadata).

The official code reads `llm_config.json` and `vit_config.json` and then overrides some fields in code
(QK-norm on, untied embeddings, MoT layers, the last ViT layer dropped, no ViT RoPE). Those overrides are
properties of the architecture, so they live here as facts, not as options. Everything else that differs
between models (AE geometry, image limits, default output size) is read from the folder, with the official
values as defaults so a Hugging Face download works as is. `from_dict` takes a config file's contents and
the place they came from, which errors name.

This module does not touch tensors or files other than small JSON configs.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing, unreadable, or describes an impossible model."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON config file's contents; a missing or malformed file is a ConfigError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _object(data: Any, source: Path | str) -> dict[str, Any]:
    """`data` if it is a JSON object: a config given as a list or a string is refused by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a JSON object")
    return data


def _pick(cls, data: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """Keep the keys the dataclass knows; report missing required ones by name."""
    names = {f.name for f in fields(cls) if f.init}
    kwargs = {k: v for k, v in _object(data, source).items() if k in names}
    required = [
        f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ConfigError(f"{source} lacks required field(s) {', '.join(missing)}")
    return kwargs


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 decoder. BAGEL always runs it as a Mixture-of-Transformers with QK-norm."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (BAGEL uses 'silu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str) -> LLMConfig:
        """From the contents of an `llm_config.json`; `source` names where they came from in errors."""
        return cls(**_pick(cls, data, source))


@dataclass(frozen=True)
class ViTConfig:
    """The SigLIP NaViT encoder. `num_hidden_layers` is the number of layers *used*: the official code
    drops the last layer of `vit_config.json` (BAGEL reads the penultimate representation)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"ViT hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_hidden_layers < 1:
            raise ConfigError("the ViT needs at least one layer after dropping the last one")

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @classmethod
    def from_json(cls, path: Path) -> ViTConfig:
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str) -> ViTConfig:
        """From the contents of a `vit_config.json` (which lists the dropped last layer too)."""
        kwargs = _pick(cls, data, source)
        kwargs["num_hidden_layers"] = kwargs["num_hidden_layers"] - 1
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        """The official `vit_config.json` form (it lists one more layer than is used)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["num_hidden_layers"] += 1
        d["model_type"] = "siglip_vision_model"
        return d


@dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder parameters (FLUX `AutoEncoderParams` field names). Defaults are the FLUX values
    the official `load_ae` hard-codes; an `ae_config.json` in the model folder overrides them."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if 2 ** (len(self.ch_mult) - 1) != self.downsample:
            raise ConfigError(
                f"ae ch_mult {list(self.ch_mult)} gives a downsample of {2 ** (len(self.ch_mult) - 1)}, "
                f"not the declared {self.downsample}"
            )

    @classmethod
    def from_json(cls, path: Path) -> VAEConfig:
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str) -> VAEConfig:
        """From the contents of an `ae_config.json`."""
        return cls(**_pick(cls, data, source))

    def to_json(self, path: Path) -> None:
        """Write `ae_config.json` (every field, so the file alone describes the AE) for `from_json`."""
        Path(path).write_text(json.dumps(asdict(self), indent=2))


@dataclass(frozen=True)
class ImageLimits:
    """How an input image is resized for one encoder (official `ImageTransform`)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class InferenceConfig:
    """What differs between models at inference time, read from an optional `bagel_inference.json`."""

    vae_limits: ImageLimits = field(default_factory=lambda: ImageLimits(1024, 512, 16))
    vit_limits: ImageLimits = field(default_factory=lambda: ImageLimits(980, 224, 14))
    default_height: int = 1024
    default_width: int = 1024

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str) -> InferenceConfig:
        """From the contents of a `bagel_inference.json` (every field optional)."""
        data = _object(data, source)
        kwargs: dict[str, Any] = {}
        for key in ("vae_limits", "vit_limits"):
            if key in data:
                kwargs[key] = ImageLimits(**data[key])
        for key in ("default_height", "default_width"):
            if key in data:
                kwargs[key] = int(data[key])
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "vae_limits": vars(self.vae_limits),
            "vit_limits": vars(self.vit_limits),
            "default_height": self.default_height,
            "default_width": self.default_width,
        }


@dataclass(frozen=True)
class BagelConfig:
    """The whole model. `max_latent_size` and `vit_max_num_patch_per_side` size the two sin-cos tables;
    the loader reads them from the tables' shapes in the checkpoint (the released model uses 64 and 70)."""

    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    timestep_freq_dim: int = 256

    def __post_init__(self) -> None:
        if self.llm.hidden_size % 4:
            raise ConfigError(
                f"hidden_size {self.llm.hidden_size} must be a multiple of 4 (2-D sin-cos table)"
            )
        tables = (
            ("vae_limits", self.inference.vae_limits, self.max_latent_size * self.latent_downsample),
            ("vit_limits", self.inference.vit_limits, self.vit_max_num_patch_per_side * self.vit.patch_size),
        )
        for name, limits, side in tables:
            if limits.max_size > side:
                raise ConfigError(
                    f"{name}.max_size {limits.max_size} exceeds the largest image its position table covers "
                    f"({side} px)"
                )

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (VAE downsample x latent patch)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample


# -- presets: the released model, the tiny test/bundled geometry, a benchmark-sized model ---------------

BAGEL_7B_MOT = BagelConfig(
    llm=LLMConfig(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    vit=ViTConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
)

TINY_CONFIG = BagelConfig(
    llm=LLMConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
    ),
    vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    # Sized for the tests' 64x64 pictures: images stay small, so contexts stay within the 4096-position
    # window. (The shapes world is 48 px: the bundled model, a different size, says so in its folder.)
    inference=InferenceConfig(
        vae_limits=ImageLimits(max_size=256, min_size=64, stride=16),
        vit_limits=ImageLimits(max_size=224, min_size=56, stride=14),
        default_height=64,
        default_width=64,
    ),
)

# A mid-size random model for benchmarks: big enough that compute, not Python, dominates a step.
MID_CONFIG = BagelConfig(
    llm=LLMConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    vit=ViTConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
)
PRESETS = {"bagel-7b-mot": BAGEL_7B_MOT, "tiny": TINY_CONFIG, "mid": MID_CONFIG}
