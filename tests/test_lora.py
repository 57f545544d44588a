"""LoRA adapters: read in PEFT format (and the module layouts BAGEL trainers save), merged by the library,
the CLI (`--lora`) and the BAGEL LoRA node without ComfyUI, each giving the image of weights merged by
hand (tests/helpers.py; pixels within 1). A zero adapter or strength 0 gives the base image; adapters that do
not fit the model fail naming what does not fit.

Every adapter here is written by the test: random factors for the bundled model's generation expert (what
BAGEL trainers adapt by default), 5 sampling steps at its 48 px default size. `write_adapter` and
`write_merged_model` (tests/helpers.py) also serve tests/comfyui/test_comfyui_lora.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ALPHA,
    NODES,
    PROMPT,
    RANK,
    SEED,
    STEPS,
    STRENGTH,
    bridge,
    gen_expert_factors,
    images,
    lib,
    run,
    write_adapter,
    write_merged_model,
)
from safetensors.torch import load_file, save_file

import bagel_model
from bagel_model import cli, lora
from bagel_model.bundled import default_model_dir
from bagel_model.sampling import T2I_SETTINGS, flow_settings

ROOT = Path(__file__).resolve().parents[1]
Q = "language_model.model.layers.0.self_attn.q_proj_moe_gen"  # a (192, 192) linear of the bundled model


def draw(model: bagel_model.BagelModel):
    return bagel_model.generate_images(
        model, PROMPT, settings=flow_settings(T2I_SETTINGS, steps=STEPS), seed=SEED
    ).images[0]


@pytest.fixture(scope="module")
def base() -> bagel_model.BagelModel:
    return bagel_model.load(default_model_dir())


@pytest.fixture(scope="module")
def base_image(base, pixels):
    return pixels(draw(base))


@pytest.fixture(scope="module")
def factors():
    return gen_expert_factors()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, factors) -> Path:
    return write_adapter(tmp_path_factory.mktemp("lora") / "shapes_lora", factors)


@pytest.fixture(scope="module")
def merged_image(tmp_path_factory, factors, pixels, base_image):
    """What the adapter at STRENGTH must draw: the image of the hand-merged weights (visibly not the base)."""
    folder = write_merged_model(tmp_path_factory.mktemp("merged") / "m", factors, STRENGTH * ALPHA / RANK)
    image = pixels(draw(bagel_model.load(folder)))
    assert np.abs(image - base_image).mean() > 5  # the adapter changes the picture: the checks below bite
    return image


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) <= 1


# -- merging --------------------------------------------------------------------------------------------


def test_zero_adapter_or_strength_zero_gives_the_base_image(
    tmp_path, base, base_image, factors, adapter_dir, pixels
):
    zero_b = {m: (a, torch.zeros_like(b)) for m, (a, b) in factors.items()}
    zero = lora.read(write_adapter(tmp_path / "zero", zero_b))
    assert np.array_equal(pixels(draw(lora.apply(base, zero))), base_image)
    assert np.array_equal(pixels(draw(lora.apply(base, lora.read(adapter_dir), 0.0))), base_image)


def test_adapter_gives_the_image_of_the_hand_merged_weights(
    base, base_image, factors, adapter_dir, merged_image, pixels
):
    adapted = lora.apply(base, lora.read(adapter_dir), STRENGTH)
    assert close(pixels(draw(adapted)), merged_image)
    assert np.array_equal(pixels(draw(base)), base_image)  # the base model is unchanged
    before, after = base.net.state_dict(keep_vars=True), adapted.net.state_dict(keep_vars=True)
    changed = {k.removesuffix(".weight") for k, v in after.items() if v is not before[k]}
    assert changed == set(factors)  # every other tensor is shared, not copied


def test_stacked_adapters_add_up(tmp_path, base, factors, adapter_dir, pixels):
    other = gen_expert_factors(seed=1, size=0.15)
    second = lora.read(write_adapter(tmp_path / "second", other))
    stacked = lora.apply(lora.apply(base, lora.read(adapter_dir), 0.5), second, -0.3)
    both = {
        m: (torch.cat([a, other[m][0]]), torch.cat([0.5 * b, -0.3 * other[m][1]], 1))
        for m, (a, b) in factors.items()
    }
    expected = bagel_model.load(write_merged_model(tmp_path / "both", both, ALPHA / RANK))
    assert close(pixels(draw(stacked)), pixels(draw(expected)))


def test_contexts_of_the_base_model_are_refused_by_the_adapted_one(base, adapter_dir):
    context = bagel_model.generate_images(
        base, PROMPT, settings=flow_settings(T2I_SETTINGS, steps=2)
    ).contexts[0]
    adapted = lora.apply(base, lora.read(adapter_dir))
    with pytest.raises(bagel_model.ContextError, match="built by another model"):
        bagel_model.edit_images(adapted, None, "make it blue", context=context)


# -- formats --------------------------------------------------------------------------------------------


def test_trainer_layouts_name_the_same_weights(tmp_path, factors):
    """Flow-Factory wraps the language model alone (`model.layers...`, `lm_head`), verl-omni's training
    module puts the decoder layers at the top (`layers...`): both land on the official names."""
    official = lora.read(write_adapter(tmp_path / "official", factors))
    language_model = {m.removeprefix("language_model."): f for m, f in factors.items()}
    flow_factory = lora.read(write_adapter(tmp_path / "ff", language_model))
    decoder = {m.removeprefix("language_model.model."): f for m, f in factors.items()}
    verl = lora.read(write_adapter(tmp_path / "verl", decoder))
    assert set(official.weights) == set(flow_factory.weights) == set(verl.weights)
    assert all(k.startswith("language_model.model.layers.") for k in official.weights)
    head = torch.zeros(RANK, 192), torch.zeros(512, RANK)
    assert set(lora.read(write_adapter(tmp_path / "head", {"lm_head": head})).weights) == {
        "language_model.lm_head.weight"
    }


def test_scale_follows_the_config(tmp_path, factors):
    config = {
        "r": RANK, "lora_alpha": 16, "rank_pattern": {}, "use_rslora": False,
        "alpha_pattern": {"q_proj_moe_gen": 2, r"layers\.1\.mlp_moe_gen\.up_proj": 32},
    }  # fmt: skip
    scales = {
        k: w.scale for k, w in lora.read(write_adapter(tmp_path / "a", factors, config)).weights.items()
    }
    layer = "language_model.model.layers.{}.{}.weight"
    assert scales[layer.format(0, "self_attn.q_proj_moe_gen")] == 2 / RANK
    assert scales[layer.format(1, "mlp_moe_gen.up_proj")] == 32 / RANK
    assert scales[layer.format(0, "mlp_moe_gen.up_proj")] == 16 / RANK
    config.update(use_rslora=True, alpha_pattern={})
    scales = {w.scale for w in lora.read(write_adapter(tmp_path / "b", factors, config)).weights.values()}
    assert scales == {16 / RANK**0.5}


def test_unmatched_modules_are_listed_with_their_count(tmp_path, base, factors):
    extra = {Q.replace("layers.0", f"layers.{n}"): factors[Q] for n in range(40, 47)}
    adapter = lora.read(write_adapter(tmp_path / "a", {**factors, **extra}))
    with pytest.raises(
        lora.LoraError, match=r"7 adapted module\(s\) match no linear layer.*layers\.40\..*and 2 more"
    ):
        lora.apply(base, adapter)
    norm = {"language_model.model.norm": (torch.zeros(RANK, 192), torch.zeros(192, RANK))}
    with pytest.raises(lora.LoraError, match="1 adapted module.*model.norm"):
        lora.apply(base, lora.read(write_adapter(tmp_path / "norm", norm)))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_config", "no adapter_config.json beside it"),
        ("stray", r"1 tensor\(s\) that are not LoRA factors.*lora_magnitude_vector"),
        ("rank", "rank 8, but its lora_A has 4 rows"),
        ("dora", "DoRA"),
        ("half", "lora_A but not its partner"),
    ],
)
def test_damaged_adapters_are_refused_naming_the_fault(tmp_path, factors, damage, message):
    module = Q
    folder = write_adapter(tmp_path / "a", {module: factors[module]})
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    if damage == "no_config":
        (folder / "adapter_config.json").unlink()
    elif damage == "stray":
        tensors[f"base_model.model.{module}.lora_magnitude_vector"] = torch.ones(3)
    elif damage in ("rank", "dora"):
        config.update(r=8) if damage == "rank" else config.update(use_dora=True)
    elif damage == "half":
        tensors.pop(f"base_model.model.{module}.lora_B.weight")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    if damage != "no_config":
        (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lora.LoraError, match=message):
        lora.read(folder / "adapter_model.safetensors")


def test_misshaped_and_quantized_targets_and_bad_strength_are_refused(tmp_path, base, factors, adapter_dir):
    wide = lora.read(write_adapter(tmp_path / "wide", {Q: (torch.zeros(RANK, 3584), torch.zeros(192, RANK))}))
    with pytest.raises(lora.LoraError, match=r"another shape.*\[192, 3584\] vs \[192, 192\]"):
        lora.apply(base, wide)
    with pytest.raises(lora.LoraError, match="not a finite number"):
        lora.apply(base, lora.read(adapter_dir), float("nan"))
    with pytest.raises(lora.LoraError, match="stored as fp8.*weights native"):
        bagel_model.load(default_model_dir(), loras=[(adapter_dir, 1.0)], weights="fp8")


def test_an_offloaded_model_keeps_its_lora_and_a_placed_one_refuses_it(
    tmp_path, adapter_dir, merged_image, pixels
):
    """Adapters merge before accelerate places the layers: offloaded layers run from weights accelerate
    keeps apart, so a merge after placement left them as they were (the image was the base's)."""
    pytest.importorskip("accelerate")
    budget = {"max_memory": {"cpu": "4MiB"}, "offload_folder": tmp_path / "off"}
    offloaded = bagel_model.load(default_model_dir(), loras=[(adapter_dir, STRENGTH)], **budget)
    assert "disk" in offloaded.net.hf_device_map.values()
    assert close(pixels(draw(offloaded)), merged_image)
    placed = bagel_model.load(default_model_dir(), max_memory={"cpu": "4MiB"}, offload_folder=tmp_path / "b")
    with pytest.raises(lora.LoraError, match="placed by a device map.*while loading"):
        lora.apply(placed, lora.read(adapter_dir))


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_lora_draws_the_hand_merged_image(tmp_path, adapter_dir, merged_image, pixels):
    out = tmp_path / "x.png"
    argv = [
        "generate",
        "--model",
        default_model_dir(),
        "--lora",
        f"{adapter_dir}:{STRENGTH}",
        "--steps",
        STEPS,
    ]
    argv += ["--seed", SEED, "--prompt", PROMPT, "--out", out, "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "bagel_model", *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["image"] == str(out)
    assert close(pixels(out), merged_image)


def test_cli_lora_option_parses_paths_and_strengths():
    parse = cli.build_parser().parse_args
    args = parse(
        ["generate", "--prompt", "p", "--out", "o.png", "--lora", "a:0.5", "--lora", "C:/x", "--lora", "b"]
    )
    assert args.lora == [("a", 0.5), ("C:/x", 1.0), ("b", 1.0)]
    assert parse(["understand", "--prompt", "p"]).lora == []


def test_cli_bad_adapter_exits_2_naming_it(tmp_path, capsys):
    rc = cli.main(["understand", "--prompt", "hi", "--lora", str(tmp_path / "nowhere")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


# -- the node, without ComfyUI ----------------------------------------------------------------------------


@pytest.fixture
def loras_folder(tmp_path, monkeypatch, adapter_dir):
    """A models/loras folder with the adapter, one file without a config (another model's LoRA) and
    nothing else, as comfy_bridge lists it."""
    shutil.copytree(adapter_dir, tmp_path / "shapes")
    (tmp_path / "sdxl_style.safetensors").touch()
    files = {p.relative_to(tmp_path).as_posix(): p for p in tmp_path.rglob("*.safetensors")}
    monkeypatch.setattr(bridge, "model_files", lambda folder: files if folder == "loras" else {})
    return tmp_path


def test_node_lists_peft_adapters_and_applies_one_to_a_new_model(
    loras_folder, base_image, merged_image, pixels
):
    names = NODES["BAGELLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    assert names == ["shapes/adapter_model.safetensors"]
    (managed,) = run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME)
    (adapted,) = run("BAGELLoraLoader", model=managed, lora_name=names[0], strength=STRENGTH)
    assert adapted.patcher is None and adapted.model is not managed.model
    settings = {"prompt": PROMPT, "seed": SEED, "steps": STEPS}
    image, context = run("BAGELTextToImage", model=adapted, **settings)["result"][:2]
    assert close(pixels(images.to_pil(image)), merged_image)
    base = run("BAGELTextToImage", model=managed, **settings)["result"][0]
    assert np.array_equal(pixels(images.to_pil(base)), base_image)  # the node's input is unchanged
    with pytest.raises(lib.ContextError, match="built by another model"):
        run("BAGELEdit", model=managed, instruction="make it blue", context=context)


def test_node_without_adapters_says_where_to_put_them(monkeypatch):
    monkeypatch.setattr(bridge, "model_files", lambda folder: {})
    names = NODES["BAGELLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    (managed,) = run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME)
    with pytest.raises(FileNotFoundError, match="not in models/loras.*adapter_config.json"):
        run("BAGELLoraLoader", model=managed, lora_name=names[0])
