"""Image preprocessing and patch layouts: the official resize rule on worked sizes, RGB conversion, the
tensor <-> PIL round trip, and the exact patch feature order.

A comparison with torchvision's resize (what the official code calls) runs only where torchvision imports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_model import images
from bagel_model.config import ImageLimits

VAE = ImageLimits(1024, 512, 16)  # app / notebook
VIT = ImageLimits(980, 224, 14)  # app / notebook
VIT_EVAL = ImageLimits(980, 378, 14)  # edit eval scripts


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Worked sizes from BAGEL_REFERENCE.md §5.1: (input, VAE size, app ViT size of the VAE-resized image).
@pytest.mark.parametrize(
    "size, vae, vit",
    [
        ((640, 480), (688, 512), (686, 518)),
        ((1920, 1080), (1024, 576), (980, 546)),
        ((300, 200), (768, 512), None),
        ((200, 150), (688, 512), (686, 518)),
    ],
)
def test_resize_dims_worked_sizes(size, vae, vit):
    assert images.resize_dims(*size, VAE) == vae
    if vit is not None:
        assert images.resize_dims(*vae, VIT) == vit


def test_resize_dims_rules():
    assert images.resize_dims(640, 480, VIT_EVAL) == (644, 476)  # eval ViT straight from the input
    # Banker's rounding in make_divisible: 3528/16 = 220.5 rounds to 220; then the long-edge re-scale.
    assert images.resize_dims(4000, 500, VAE) == (1024, 128)
    # The max_pixels budget is shared between img_num images, and the official re-scale applies the *area*
    # ratio to each side (0.47 here), shrinking more than needed: 980 -> 460.8 -> 462, not 672.
    assert images.resize_dims(980, 980, VIT) == (980, 980)
    assert images.resize_dims(980, 980, VIT, img_num=4) == (462, 462)
    assert images.resize_dims(3, 2, ImageLimits(8, 1, 16)) == (16, 16)  # never below one stride


def test_resize_dims_is_idempotent_for_the_official_limits():
    # The official VAE path resizes an already VAE-resized image again; that must keep its size.
    for limits in (VAE, VIT, VIT_EVAL):
        for w in range(7, 3000, 37):
            for h in range(5, 3000, 53):
                once = images.resize_dims(w, h, limits)
                assert images.resize_dims(*once, limits) == once, (w, h, limits)


def test_zero_size_is_rejected():
    with pytest.raises(ValueError, match="zero size"):
        images.resize_dims(0, 10, VAE)
    with pytest.raises(ValueError, match="zero size"):
        images.to_rgb(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="zero size"):
        images.resize(Image.new("RGB", (5, 0)), VAE)
    with pytest.raises(ValueError, match="PIL image"):
        images.to_tensor(np.zeros((4, 4, 3), dtype=np.uint8))


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue -> light blue
    rgb = images.to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = rgb.getpixel((1, 0))
    assert r == g and 126 <= r <= 128 and b == 255


def test_transparency_key_is_composited_on_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    rgb = images.to_rgb(palette)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (10, 200, 30)
    assert images.to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_resize_uses_pil_bicubic():
    image = _noise_image(301, 173)
    out = images.resize(image, VAE)
    assert out.size == (896, 512)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((896, 512), Image.Resampling.BICUBIC)))
    same = _noise_image(688, 512)
    assert images.resize(same, VAE) is same


def test_prepare_context_image_resizes_for_the_vit_after_the_vae():
    image = Image.new("RGBA", (640, 480), (0, 0, 0, 0))
    vae_image, vit_image = images.prepare_context_image(image, VAE, VIT)
    assert vae_image.mode == vit_image.mode == "RGB"
    assert vae_image.size == (688, 512)
    assert vit_image.size == (686, 518)  # not (644, 476)-like sizes from the original
    assert vit_image.getpixel((0, 0)) == (255, 255, 255)


def test_tensor_round_trip():
    image = _noise_image(24, 16)
    x = images.to_tensor(image)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32
    assert torch.equal(x[:, 3, 5], torch.tensor(image.getpixel((5, 3)), dtype=torch.float32) / 255 * 2 - 1)
    assert images.from_tensor(x.to(torch.bfloat16)).size == (24, 16)
    # Every level: the official decode truncates, so a level that comes back as 14.99999 becomes 14.
    levels = np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 256, 1), 3, axis=2)
    back = np.asarray(images.from_tensor(images.to_tensor(Image.fromarray(levels))))
    lost = levels.astype(int) - back
    assert lost.min() == 0 and lost.max() <= 1
    full = images.to_tensor(Image.fromarray(levels))
    assert full.min() == -1 and full.max() == 1


def test_from_tensor_clamps_and_truncates():
    x = torch.tensor([-2.0, 2.0, 0.999, 0.0]).view(1, 1, 4).expand(3, 1, 4)
    pixels = np.asarray(images.from_tensor(x))[0, :, 0]
    # (0.999 * 0.5 + 0.5) * 255 = 254.87 and 0.5 * 255 = 127.5 truncate to 254 and 127.
    assert pixels.tolist() == [0, 255, 254, 127]
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        images.from_tensor(torch.zeros(1, 3, 4, 4))


def test_patchify_feature_order():
    p, c, h, w = 2, 3, 2, 3
    x = torch.arange(c * h * p * w * p).view(c, h * p, w * p)
    tokens = images.patchify(x, p)
    assert tokens.shape == (h * w, p * p * c)
    for r in range(h):
        for col in range(w):
            for py in range(p):
                for px in range(p):
                    for ch in range(c):
                        feature = (py * p + px) * c + ch
                        assert tokens[r * w + col, feature] == x[ch, r * p + py, col * p + px]


def test_patchify_round_trip_latent_layout():
    latent = torch.randn(16, 2 * 5, 2 * 7)
    tokens = images.patchify(latent, 2)
    assert tokens.shape == (35, 64)
    assert torch.equal(images.unpatchify_latent(tokens, 5, 7, 2, 16), latent)
    with pytest.raises(ValueError, match="not divisible"):
        images.patchify(torch.zeros(3, 15, 14), 14)
    with pytest.raises(ValueError, match="expected tokens"):
        images.unpatchify_latent(tokens, 7, 5, 2, 8)


def test_flattened_position_ids():
    ids = images.flattened_position_ids(2, 3, 70)
    assert ids.tolist() == [0, 1, 2, 70, 71, 72]
    assert ids.dtype == torch.int64
    with pytest.raises(ValueError, match="exceed"):
        images.flattened_position_ids(71, 3, 70)


def _torchvision_functional():
    try:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tf
    except Exception as e:  # not installed, or a build that does not match torch
        pytest.skip(f"torchvision is not usable here: {e}")
    return tf, InterpolationMode


def _assert_matches_torchvision(sources: list[Image.Image]) -> None:
    tf, mode = _torchvision_functional()
    for image in sources:
        for limits in (VAE, VIT, VIT_EVAL):
            w, h = images.resize_dims(image.width, image.height, limits)
            expected = tf.resize(image, [h, w], mode.BICUBIC, antialias=True)
            ours = images.resize(image, limits)
            assert np.array_equal(np.asarray(ours), np.asarray(expected))
            reference = tf.normalize(tf.to_tensor(expected), [0.5] * 3, [0.5] * 3)
            assert torch.equal(images.to_tensor(ours), reference)


def test_matches_torchvision_resize_and_to_tensor():
    _assert_matches_torchvision([_noise_image(301, 173), _noise_image(1700, 1100, seed=1)])


def test_matches_torchvision_on_the_reference_input(input_png: Path):
    with Image.open(input_png) as im:
        _assert_matches_torchvision([im.convert("RGB")])
