"""FLUX autoencoder: checkpoint layout, the tiny official weights, encode/decode invariants, and numbers
pinned from the official implementation.

Each test of the official tiny checkpoints runs on every reference (conftest: the in-repository one, and
the shared one where present), with numbers pinned per reference. The in-process comparison with the
official BAGEL code runs only when $BAGEL_OFFICIAL_DIR points at a checkout of it; the pins in
`test_matches_numbers_pinned_from_official` keep a cross-implementation check in CI.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_model.config import VAEConfig
from bagel_model.layers.vae import AutoEncoder


def _pattern(shape: tuple[int, ...], freq: float, amp: float) -> torch.Tensor:
    """A fixed, RNG-free tensor: amp * sin(freq * flat_index)."""
    return (torch.sin(torch.arange(math.prod(shape), dtype=torch.float32) * freq) * amp).reshape(shape)


@pytest.fixture(scope="module")
def tiny_cfg(official_tiny: Path) -> VAEConfig:
    return VAEConfig.from_json(official_tiny / "ae_config.json")


@pytest.fixture(scope="module")
def tiny_sd(official_tiny: Path) -> dict[str, torch.Tensor]:
    """The autoencoder's weights in float32, as the loader reads them."""
    return {k: v.float() for k, v in load_file(official_tiny / "ae.safetensors").items()}


@pytest.fixture(scope="module")
def tiny_ae(tiny_cfg, tiny_sd) -> AutoEncoder:
    ae = AutoEncoder(tiny_cfg).eval().requires_grad_(False)
    ae.load_state_dict(tiny_sd, strict=True)
    return ae


def test_default_layout_is_the_official_checkpoint(official_ae_keys):
    with torch.device("meta"):
        ae = AutoEncoder(VAEConfig())
    shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert shapes == official_ae_keys
    assert len(shapes) == 244
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683
    assert list(ae.buffers()) == []
    assert all(p.is_meta for p in ae.parameters())


def test_layout_follows_config():
    # 3 levels of 3 resnets: downsample after levels 0-1, upsample at levels 1-2, 4 resnets per decoder level.
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=3, downsample=4, z_channels=4)
    with torch.device("meta"):
        sd = AutoEncoder(cfg).state_dict()

    def levels(pattern: str) -> set[int]:
        head, tail = pattern.split("{}")
        return {int(k[len(head) :].split(".")[0]) for k in sd if k.startswith(head) and k.endswith(tail)}

    assert levels("encoder.down.{}.downsample.conv.weight") == {0, 1}
    assert levels("decoder.up.{}.upsample.conv.weight") == {1, 2}
    for i in range(3):
        assert levels(f"encoder.down.{i}.block.{{}}.conv1.weight") == {0, 1, 2}
        assert levels(f"decoder.up.{i}.block.{{}}.conv1.weight") == {0, 1, 2, 3}
    shortcuts = {k for k in sd if "nin_shortcut" in k}
    # Width changes 32 -> 64 entering encoder level 1 and 64 -> 32 entering decoder level 0.
    assert shortcuts == {
        f"{p}.nin_shortcut.{t}"
        for p in ("encoder.down.1.block.0", "decoder.up.0.block.0")
        for t in ("weight", "bias")
    }
    assert sd["encoder.conv_out.weight"].shape == (8, 64, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (64, 4, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 32, 3, 3)


def test_tiny_official_weights_load_strictly(tiny_cfg, tiny_sd):
    ae = AutoEncoder(tiny_cfg)
    result = ae.load_state_dict(tiny_sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(ae.decoder.up[1].upsample.conv.weight, tiny_sd["decoder.up.1.upsample.conv.weight"])

    # The loader's path: build on meta, then assign the checkpoint tensors.
    with torch.device("meta"):
        meta_ae = AutoEncoder(tiny_cfg)
    meta_ae.load_state_dict(tiny_sd, strict=True, assign=True)
    assert not any(p.is_meta for p in meta_ae.parameters())
    x = _pattern((1, 3, 16, 16), 0.05, 1.0)
    with torch.no_grad():
        assert torch.equal(meta_ae.encode(x), ae.encode(x))


def test_encode_is_the_scaled_posterior_mean_and_leaves_the_rng_alone(tiny_ae, tiny_cfg):
    x = _pattern((1, 3, 32, 32), 0.011, 1.0)
    rng = torch.get_rng_state()
    with torch.no_grad():
        z1, z2 = tiny_ae.encode(x), tiny_ae.encode(x)
        moments = tiny_ae.encoder(x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(z1, z2)
    mean = moments[:, : tiny_cfg.z_channels]
    torch.testing.assert_close(z1, tiny_cfg.scale_factor * (mean - tiny_cfg.shift_factor), rtol=0, atol=1e-6)


def test_decode_unscales_before_the_decoder(tiny_ae, tiny_cfg):
    z = _pattern((1, tiny_cfg.z_channels, 4, 6), 0.37, 1.5)
    with torch.no_grad():
        image = tiny_ae.decode(z)
        direct = tiny_ae.decoder(z / tiny_cfg.scale_factor + tiny_cfg.shift_factor)
        unscaled = tiny_ae.decoder(z)
    torch.testing.assert_close(image, direct, rtol=0, atol=1e-6)
    assert (image - unscaled).abs().max() > 1e-2  # the scaling is not a no-op for these weights


def test_shapes_and_batching(tiny_ae, tiny_cfg):
    x = torch.cat([_pattern((1, 3, 48, 64), 0.011, 1.0), _pattern((1, 3, 48, 64), 0.023, 0.8)])
    with torch.no_grad():
        z = tiny_ae.encode(x)
        image = tiny_ae.decode(z)
        z_single = torch.cat([tiny_ae.encode(x[:1]), tiny_ae.encode(x[1:])])
        image_single = torch.cat([tiny_ae.decode(z[:1]), tiny_ae.decode(z[1:])])
    assert z.shape == (2, tiny_cfg.z_channels, 6, 8)
    assert image.shape == (2, 3, 48, 64)
    torch.testing.assert_close(z, z_single, rtol=0, atol=1e-5)
    torch.testing.assert_close(image, image_single, rtol=0, atol=1e-5)
    assert not torch.allclose(z[0], z[1], atol=1e-2)


def test_bf16_follows_the_input_dtype(tiny_cfg, tiny_sd):
    ae32 = AutoEncoder(tiny_cfg).requires_grad_(False)
    ae32.load_state_dict(tiny_sd, strict=True)
    ae16 = AutoEncoder(tiny_cfg).requires_grad_(False)
    ae16.load_state_dict(tiny_sd, strict=True)
    ae16.to(torch.bfloat16)
    x = _pattern((1, 3, 32, 32), 0.011, 1.0)
    with torch.no_grad():
        z16 = ae16.encode(x.bfloat16())
        image16 = ae16.decode(z16)
        z32 = ae32.encode(x)
        image32 = ae32.decode(z16.float())
    assert z16.dtype == image16.dtype == torch.bfloat16
    assert (z16.float() - z32).abs().max() < 0.05
    assert (image16.float() - image32).abs().max() < 0.1


def test_device_and_dtype_are_read_from_the_weights():
    ae = AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, downsample=4, z_channels=4))
    assert (ae.device, ae.dtype) == (torch.device("cpu"), torch.float32)
    ae.to(torch.bfloat16)
    assert ae.dtype == torch.bfloat16


# Computed once from the official BAGEL `modeling/autoencoder.py` (FLUX code), run in-process on each
# reference's weights with `DiagonalGaussian(sample=False)`, on the RNG-free inputs below: z[0, ::4, 3, 5]
# then mean and mean |z| of the encoding; image[0, :, 17, 40:42] then mean and mean |image| of the decoding.
# Our max abs error against those official outputs, over the whole tensors, was 2.0e-6 (encode) and
# 3.3e-6 (decode) in fp32 on the shared reference.
PINS = {
    "in_repo": (
        [0.26853892, 0.21927322, 0.43065122, 0.13736011, -0.11789017, 0.27950013],
        [-0.27573118, -0.31167796, -0.41764241, -0.20784084, -1.6676141, -1.75912476, -0.8617841, 1.06389034],
    ),
    "shared": (
        [0.22992034, -0.38759333, -0.23388557, 0.11630637, -0.019573785, 0.18342829],
        [0.75333822, 0.69502866, -0.53082311, -0.45225802, -0.26936248, -0.28347355, -0.17391954, 0.38109243],
    ),
}


def test_matches_numbers_pinned_from_official(tiny_ae, reference_name):
    x = _pattern((1, 3, 48, 64), 0.011, 1.0)
    z_in = _pattern((1, 16, 6, 8), 0.37, 1.5)
    with torch.no_grad():
        z = tiny_ae.encode(x)
        image = tiny_ae.decode(z_in)
    got_encode = [*z[0, ::4, 3, 5].tolist(), z.mean().item(), z.abs().mean().item()]
    got_decode = [*image[0, :, 17, 40:42].flatten().tolist(), image.mean().item(), image.abs().mean().item()]
    pin_encode, pin_decode = PINS[reference_name]
    assert got_encode == pytest.approx(pin_encode, rel=0, abs=1e-4)
    assert got_decode == pytest.approx(pin_decode, rel=0, abs=1e-4)


def _official_module(official_dir: Path):
    pytest.importorskip("einops", reason="the official autoencoder needs einops")
    path = official_dir / "modeling" / "autoencoder.py"
    spec = importlib.util.spec_from_file_location("bagel_official_autoencoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _official_ae(official, cfg: VAEConfig):
    params = official.AutoEncoderParams(**{**asdict(cfg), "ch_mult": list(cfg.ch_mult)})
    ae = official.AutoEncoder(params)
    ae.reg.sample = False  # the posterior mean, as our encode
    return ae.eval().requires_grad_(False)


def test_matches_official_module(tiny_ae, tiny_cfg, tiny_sd, official_dir, input_png):
    official = _official_module(official_dir)
    image_module = pytest.importorskip("PIL.Image")
    import numpy as np

    ref = _official_ae(official, tiny_cfg)
    ref.load_state_dict(tiny_sd, strict=True)
    image = image_module.open(input_png).convert("RGB")
    pixels = np.array(image.resize((64, 64), image_module.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1
    z_in = _pattern((1, 16, 6, 8), 0.37, 1.5)
    with torch.no_grad():
        torch.testing.assert_close(tiny_ae.encode(x), ref.encode(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(tiny_ae.decode(z_in), ref.decode(z_in), rtol=0, atol=1e-4)

    # Layouts agree for other geometries, and so do the numbers with random weights.
    for cfg in (
        VAEConfig(),
        VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=3, downsample=4, z_channels=4),
    ):
        with torch.device("meta"):
            ours_sd, ref_sd = AutoEncoder(cfg).state_dict(), _official_ae(official, cfg).state_dict()
        assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    torch.manual_seed(0)
    ref = _official_ae(official, cfg)
    ours = AutoEncoder(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _pattern((2, 3, 24, 40), 0.017, 1.0)
    z_in = _pattern((2, 4, 6, 10), 0.29, 1.2)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref.encode(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(z_in), ref.decode(z_in), rtol=0, atol=1e-4)
