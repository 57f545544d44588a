"""Quantized weight storage: what fp8 saves on the 7B shape, and what each mode costs on a real forward."""

import sys

import numpy as np
import pytest
import torch

import bagel_model
from bagel_model import tasks
from bagel_model.config import BAGEL_7B_MOT
from bagel_model.layout import CheckpointError
from bagel_model.model import Bagel
from bagel_model.quant import BnbLinear, Fp8Linear, quantize_linears
from bagel_model.sampling import FlowSettings


def test_fp8_halves_the_7b_decoder():
    with torch.device("meta"):
        net = Bagel(BAGEL_7B_MOT)
    bf16 = sum(t.numel() * 2 for t in [*net.parameters(), *net.buffers()])
    quantize_linears(net, "fp8", torch.bfloat16)
    # fp8 weights 1 byte, their per-row scales fp32, everything else bf16
    sizes = {torch.float8_e4m3fn: 1, torch.float32: 2}
    scales = sum(m.scale.numel() * 2 for m in net.modules() if isinstance(m, Fp8Linear))
    fp8 = scales + sum(t.numel() * sizes[t.dtype] for t in [*net.parameters(), *net.buffers()])
    assert bf16 == 2 * 14_607_260_128
    assert fp8 < 16.0e9, f"fp8 weights take {fp8 / 1e9:.2f} GB"
    assert fp8 < 0.55 * bf16


def test_fp8_layer_matches_its_dequantized_weight():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    layer = Fp8Linear(32, 48, bias=False)
    layer.store(w)
    x = torch.randn(5, 32)
    rel = (layer(x) - x @ w.T).norm() / (x @ w.T).norm()
    assert 1e-4 < rel < 0.05  # really quantized, and close


def test_fp8_model_generates_nearly_the_same_image(tiny_dir, tiny_model, pixels):
    fp8 = bagel_model.load(tiny_dir, weights="fp8")
    assert isinstance(fp8.net.language_model.model.layers[0].mlp_moe_gen.up_proj, Fp8Linear)
    settings = FlowSettings(num_steps=4)
    a = tasks.generate_images(tiny_model, "a red circle at the top", settings=settings, seed=3).images[0]
    b = tasks.generate_images(fp8, "a red circle at the top", settings=settings, seed=3).images[0]
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.mean() < 2.0 and diff.max() <= 16


def test_unknown_weight_mode(tiny_dir):
    with pytest.raises(CheckpointError, match="weight mode 'int3' is unknown"):
        bagel_model.load(tiny_dir, weights="int3")


@pytest.mark.parametrize(("mode", "max_mean"), [("int8", 2.0), ("nf4", 12.0)])
def test_bitsandbytes_modes_store_less_and_draw_nearly_the_same(tiny_dir, tiny_model, pixels, mode, max_mean):
    pytest.importorskip("bitsandbytes")
    model = bagel_model.load(tiny_dir, weights=mode)
    layer = model.net.language_model.model.layers[0].mlp_moe_gen.up_proj
    assert isinstance(layer, BnbLinear)
    native = tiny_model.net.language_model.model.layers[0].mlp_moe_gen.up_proj.weight
    stored = layer.inner.weight
    assert stored.numel() * stored.element_size() <= native.numel() * {"nf4": 0.5, "int8": 1}[mode]
    settings = FlowSettings(num_steps=4)
    a = tasks.generate_images(tiny_model, "a red circle at the top", settings=settings, seed=3).images[0]
    b = tasks.generate_images(model, "a red circle at the top", settings=settings, seed=3).images[0]
    assert 0 < np.abs(pixels(a) - pixels(b)).mean() < max_mean  # really quantized, and close
    answer, _ = tasks.understand(model, "what is in the image?", image=a)  # one-token rows through the head
    assert isinstance(answer, str)


def test_bitsandbytes_modes_say_how_to_get_the_package(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        bagel_model.load(tiny_dir, weights="nf4")
