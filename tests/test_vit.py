"""SigLIP NaViT encoder: checkpoint layout, the tiny official weights, per-image attention isolation, and
numbers pinned from the official implementation.

Each test of the official tiny checkpoints runs on every reference (conftest: the in-repository one, and
the shared one where present), with numbers pinned per reference. The in-process comparison with the
official BAGEL code runs only when $BAGEL_OFFICIAL_DIR points at a checkout of it; the pins in
`test_matches_numbers_pinned_from_official` keep a cross-implementation check in CI.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from bagel_model import images
from bagel_model.config import BAGEL_7B_MOT, BagelConfig, ViTConfig
from bagel_model.layers.vit import SiglipVisionModel
from bagel_model.layout import read_config

PREFIX = "vit_model."


def _vit_entries(state: dict) -> dict:
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tiny_cfg(official_tiny: Path) -> ViTConfig:
    return ViTConfig.from_json(official_tiny / "vit_config.json")


@pytest.fixture(scope="module")
def tiny_sd(official_tiny: Path) -> dict[str, torch.Tensor]:
    """The ViT's weights in float32, as the loader reads them (the in-repository file stores bf16)."""
    return {k: v.float() for k, v in _vit_entries(load_file(official_tiny / "ema.safetensors")).items()}


@pytest.fixture(scope="module")
def model_cfg(official_tiny: Path) -> BagelConfig:
    """The reference's whole config: its image limits and position-table side prepare the ViT's input."""
    return read_config(official_tiny)


@pytest.fixture(scope="module")
def tiny_vit(tiny_cfg, tiny_sd) -> SiglipVisionModel:
    with torch.device("meta"):
        vit = SiglipVisionModel(tiny_cfg)
    vit.load_state_dict(tiny_sd, strict=True, assign=True)
    return vit.eval().requires_grad_(False)


def _vit_image(path: Path, cfg: BagelConfig) -> torch.Tensor:
    """input.png prepared as the official inferencer does for the ViT (VAE resize first), (3, H, W)."""
    limits = cfg.inference
    _, vit_image = images.prepare_context_image(Image.open(path), limits.vae_limits, limits.vit_limits)
    return images.to_tensor(vit_image)


def _tokens(x: torch.Tensor, cfg: BagelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches (n, 3 p p) and flattened position ids (n,) of one image (3, H, W)."""
    p = cfg.vit.patch_size
    ids = images.flattened_position_ids(x.shape[1] // p, x.shape[2] // p, cfg.vit_max_num_patch_per_side)
    return images.patchify(x, p), ids


def _input_tokens(path: Path, cfg: BagelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return _tokens(_vit_image(path, cfg), cfg)


def _second_tokens(path: Path, cfg: BagelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A second, differently shaped image (a crop of input.png) to pack after the first."""
    crop = images.resize(images.to_rgb(Image.open(path).crop((10, 5, 150, 120))), cfg.inference.vit_limits)
    return _tokens(images.to_tensor(crop), cfg)


def test_7b_layout_is_the_official_checkpoint(official_7b_keys):
    expected = _vit_entries(official_7b_keys)
    with torch.device("meta"):
        vit = SiglipVisionModel(BAGEL_7B_MOT.vit)
    ours = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert ours == expected
    assert len(ours) == 3 + 26 * 16 + 2  # embeddings, 16 tensors per layer, post_layernorm
    assert all(t.is_meta for t in vit.parameters())


def test_tiny_official_weights_load_strictly(tiny_cfg, tiny_sd):
    vit = SiglipVisionModel(tiny_cfg)
    result = vit.load_state_dict(tiny_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert tiny_cfg.num_hidden_layers == 2  # vit_config.json lists 3; the last is dropped


def test_images_of_a_pack_do_not_see_each_other(tiny_vit, input_png, model_cfg):
    a, ids_a = _input_tokens(input_png, model_cfg)
    b, ids_b = _second_tokens(input_png, model_cfg)
    with torch.no_grad():
        packed = tiny_vit(torch.cat([a, b]), torch.cat([ids_a, ids_b]), [len(a), len(b)], attn_backend="sdpa")
        alone_a = tiny_vit(a, ids_a, [len(a)])
        alone_b = tiny_vit(b, ids_b, [len(b)])
        joint = tiny_vit(torch.cat([a, b]), torch.cat([ids_a, ids_b]), [len(a) + len(b)])
    torch.testing.assert_close(packed, torch.cat([alone_a, alone_b]), rtol=0, atol=1e-5)
    assert (joint[: len(a)] - alone_a).abs().max() > 1e-3  # one sequence would mix them


def test_bf16_runs_and_stays_close(tiny_cfg, tiny_sd, input_png, model_cfg):
    vit = SiglipVisionModel(tiny_cfg).eval()
    vit.load_state_dict(tiny_sd)
    a, ids = _input_tokens(input_png, model_cfg)
    with torch.no_grad():
        ref = vit(a, ids, [len(a)])
        out = vit.to(torch.bfloat16)(a, ids, [len(a)])  # fp32 patches are cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1


def test_bad_inputs_are_reported(tiny_vit, tiny_cfg):
    patches = torch.zeros(6, tiny_cfg.patch_dim)
    ids = torch.arange(6)
    with pytest.raises(ValueError, match="sum to the 6"):
        tiny_vit(patches, ids, [2, 3])
    with pytest.raises(ValueError, match="patches must be"):
        tiny_vit(torch.zeros(6, 5), ids, [6])
    with pytest.raises(ValueError, match="hidden_act"):
        SiglipVisionModel(ViTConfig(32, 64, 1, 2, hidden_act="relu"))


# Computed once from the official BAGEL `modeling/bagel/siglip_navit.py` (ByteDance-Seed/Bagel @056b5fd),
# run in-process in fp32 on CPU with each reference's checkpoint, flash_attn_varlen_func replaced by exact
# per-image SDPA and its bf16 casts of q/k/v lifted (the `official` fixture below), on input.png prepared by
# `_input_tokens` with the reference's limits (the official patchify and position ids give identical
# tokens): the token count, three output rows' first 4 features, and the sum over the whole output. Our
# fp32 output is within 1e-6 of the official one on a two-image pack (`test_matches_official_module`).
PINNED_TOKENS = {"in_repo": 14 * 10, "shared": 49 * 37}  # ViT patches: of a 196x140 image, of a 686x518 one
PINNED_ROWS = {
    "in_repo": {
        0: [0.3874934, 0.48562774, -0.48606715, 1.47048748],
        70: [0.29013947, 0.45901725, -0.46897286, 1.51202083],
        139: [0.4126339, 0.43943155, -0.4499816, 1.51981974],
    },
    "shared": {
        0: [1.01207018, 0.38106379, -0.38945124, 0.79918927],
        1000: [1.06712711, 0.39943862, -0.41384763, 0.74563462],
        1812: [0.95773721, 0.38545614, -0.40487865, 0.79083329],
    },
}
PINNED_SUM = {"in_repo": 2245.10009765625, "shared": 59776.1484375}


def test_matches_numbers_pinned_from_official(tiny_vit, input_png, model_cfg, reference_name):
    tokens, ids = _input_tokens(input_png, model_cfg)
    assert tokens.shape == (PINNED_TOKENS[reference_name], 3 * model_cfg.vit.patch_size**2)
    with torch.no_grad():
        out = tiny_vit(tokens, ids, [len(tokens)])
    for row, values in PINNED_ROWS[reference_name].items():
        torch.testing.assert_close(out[row, :4], torch.tensor(values), rtol=0, atol=1e-5)
    assert out.sum().item() == pytest.approx(PINNED_SUM[reference_name], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The official module, in-process (only with $BAGEL_OFFICIAL_DIR)


def _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **_):
    """Stand-in for flash_attn_varlen_func: exact SDPA on each sequence of the pack (top-left causal is
    not needed: the ViT is bidirectional)."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and not causal
    bounds = cu_seqlens_q.tolist()
    outs = [
        F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs)


class _TorchWithoutBf16:
    """The official attention casts q/k/v to torch.bfloat16 right before flash-attn; seen through this
    proxy (as the module's `torch`), that cast keeps fp32."""

    bfloat16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def official(monkeypatch, official_dir):
    """(siglip_navit, data_utils) of the official checkout, imported without its package __init__s (they
    pull in flash-attn and compile flex-attention); sys.modules is restored afterwards."""
    root = official_dir
    pytest.importorskip("transformers", reason="the official SigLIP code needs transformers")
    # transformers probes for flash_attn with find_spec: import what it needs before the stand-in exists.
    import transformers.activations  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    packages = ("modeling", "modeling.bagel", "modeling.siglip", "data")
    for name in packages:
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        monkeypatch.setitem(sys.modules, name, package)
    flash_attn = types.ModuleType("flash_attn")
    flash_attn.flash_attn_varlen_func = _varlen_sdpa
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn)
    navit = importlib.import_module("modeling.bagel.siglip_navit")
    data_utils = importlib.import_module("data.data_utils")
    navit.torch = _TorchWithoutBf16()
    yield navit, data_utils
    for name in [n for n in sys.modules if n.startswith(tuple(p + "." for p in packages))]:
        del sys.modules[name]


def test_matches_official_module(official, tiny_vit, tiny_sd, official_tiny, input_png, model_cfg):
    navit, data_utils = official
    cfg = navit.SiglipVisionConfig.from_json_file(str(official_tiny / "vit_config.json"))
    cfg.rope = False
    cfg.num_hidden_layers -= 1
    ref = navit.SiglipVisionModel(cfg)
    ref.vision_model.embeddings.convert_conv2d_to_linear(cfg)
    ref.load_state_dict(tiny_sd, strict=True)
    ref.eval()

    # Our preprocessing of the tokens equals the official patchify and position ids.
    a, ids_a = _input_tokens(input_png, model_cfg)
    limits = model_cfg.inference
    _, vit_image = images.prepare_context_image(
        data_utils.pil_img2rgb(Image.open(input_png)), limits.vae_limits, limits.vit_limits
    )
    x = images.to_tensor(vit_image)
    p, side = model_cfg.vit.patch_size, model_cfg.vit_max_num_patch_per_side
    assert torch.equal(data_utils.patchify(x, p), a)
    official_ids = data_utils.get_flattened_position_ids_extrapolate(x.shape[1], x.shape[2], p, side)
    assert torch.equal(official_ids, ids_a)

    b, ids_b = _second_tokens(input_png, model_cfg)
    lens = [len(a), len(b)]
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    with torch.no_grad():
        expected = ref(torch.cat([a, b]), torch.cat([ids_a, ids_b]), cu, max(lens))
        ours = tiny_vit(torch.cat([a, b]), torch.cat([ids_a, ids_b]), lens, attn_backend="sdpa")
    err = (ours - expected).abs().max().item()
    print(f"max abs error vs official (fp32, {sum(lens)} tokens, 2 images): {err:.3g}")
    assert err < 1e-5
