"""LoRA training (`bagel_model.training.finetune`): data folders, determinism, resume, interrupts, formats.

The bundled model trains on a few shapes-world examples written here; every run is a handful of steps, so
the numbers checked are exact equalities between runs that must agree, not learning (the learning proof
on held-out cases is `benchmarks/bench_lora.py`, its table in the README).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import bagel_model
from bagel_model import lora
from bagel_model.bundled import default_model_dir
from bagel_model.cli import main
from bagel_model.shapes import describe, render, sample_scene
from bagel_model.training.finetune import STATE_FILE, LoraSettings, train_lora
from bagel_model.training.folder import DataError, read_folder

SIZE = 48


@pytest.fixture(scope="module")
def model() -> bagel_model.BagelModel:
    return bagel_model.load(default_model_dir())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two captions, two edits and one image with questions."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for i in range(2):
        scene = sample_scene(rng, 1, 1)
        render(scene, SIZE).save(folder / f"cap{i}.png")
        (folder / f"cap{i}.txt").write_text(describe(scene).replace("red", "crimson"))
        before, after = sample_scene(rng, 1, 1), sample_scene(rng, 2, 2)
        render(before, SIZE).save(folder / f"ed{i}_src.png")
        render(after, SIZE).save(folder / f"ed{i}_tgt.png")
        (folder / f"ed{i}.txt").write_text("make it busy")
    render(sample_scene(rng, 1, 1), SIZE).save(folder / "q.png")
    (folder / "q.qa.json").write_text(json.dumps([{"question": "what is here?", "answer": "a shape"}]))
    return folder


def quick(**kw) -> LoraSettings:
    return LoraSettings(**{"steps": 4, "lr": 1e-3, "rank": 4, "save_every": 2, **kw})


def factors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / lora.WEIGHTS_FILE))


def test_a_folder_reads_into_one_plan_per_example_of_each_kind(data, model):
    examples = read_folder(data, model.config)
    assert examples.counts == {"t2i": 2, "edit": 2, "understand": 1}
    assert LoraSettings().experts(examples) == ("gen", "und")
    edit = next(p for p in examples.plans if p.task == "edit")
    kinds = [type(item).__name__ for item in edit.items]
    assert kinds == ["Vae", "Vit", "Text", "Target"]  # the edit task's context layout
    assert edit.items[0].image.size == edit.items[3].image.size == (SIZE, SIZE)


def test_every_bad_example_is_named_before_training(tmp_path, data, model):
    for name in ("cap0.png", "ed0_src.png", "cap1.png"):
        (tmp_path / name).write_bytes((data / name).read_bytes())
    (tmp_path / "cap1.txt").write_text("   ")  # empty caption
    (tmp_path / "lonely.txt").write_text("a caption without its image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.txt").write_text("a caption")
    (tmp_path / "wide_src.png").write_bytes((data / "cap1.png").read_bytes())
    render(sample_scene(random.Random(1)), SIZE).resize((96, 48)).save(tmp_path / "wide_tgt.png")
    (tmp_path / "wide.txt").write_text("stretch it")
    (tmp_path / "q.qa.json").write_text('{"question": "no image for me"}')
    with pytest.raises(DataError) as err:
        read_folder(tmp_path, model.config)
    message = str(err.value)
    assert "has 7 bad example(s)" in message
    for expected in (
        "cap0.png: has no caption cap0.txt or questions cap0.qa.json beside it",
        "ed0_src.png: has no target image ed0_tgt.png beside it",
        "cap1.txt: is empty",
        "lonely.txt: has no image lonely.png beside it",
        "broken.png: cannot be read as an image",
        "wide_tgt.png: is 96x48 but its source wide_src.png is 48x48",
        "q.qa.json: has no image q.png beside it",
    ):
        assert expected in message


def test_an_empty_folder_says_what_to_put_there(tmp_path, model):
    with pytest.raises(DataError, match="holds no examples: put name.png"):
        read_folder(tmp_path, model.config)


def test_the_same_seed_gives_the_same_adapter_and_another_seed_another(tmp_path, data, model):
    examples = read_folder(data, model.config)
    a = train_lora(model, examples, tmp_path / "a", quick())
    b = train_lora(model, examples, tmp_path / "b", quick())
    train_lora(model, examples, tmp_path / "c", quick(seed=1))
    fa, fb, fc = factors(tmp_path / "a"), factors(tmp_path / "b"), factors(tmp_path / "c")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not all(torch.equal(fa[k], fc[k]) for k in fa)
    assert a.history == b.history and len(a.history) == 4
    assert any(v.abs().max() > 0 for k, v in fa.items() if "lora_B" in k)  # it trained


def test_a_run_resumed_from_its_half_way_save_equals_the_whole_run(tmp_path, data, model):
    examples = read_folder(data, model.config)
    whole = train_lora(model, examples, tmp_path / "whole", quick())
    train_lora(model, examples, tmp_path / "half", quick(steps=2))
    resumed = train_lora(model, examples, tmp_path / "half", quick(), resume=tmp_path / "half")
    assert resumed.steps == 4 and resumed.history == whole.history
    fw, fr = factors(tmp_path / "whole"), factors(tmp_path / "half")
    assert fw.keys() == fr.keys() and all(torch.equal(fw[k], fr[k]) for k in fw)


def test_an_interrupted_run_leaves_a_loadable_adapter_that_resumes_exactly(tmp_path, data, model):
    examples = read_folder(data, model.config)
    train_lora(model, examples, tmp_path / "whole", quick(steps=5, save_every=100))

    def stop(report):
        if report.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(model, examples, tmp_path / "cut", quick(steps=5, save_every=100), callback=stop)
    assert torch.load(tmp_path / "cut" / STATE_FILE, weights_only=False)["step"] == 3
    lora.check(model.net, lora.read(tmp_path / "cut"), 1.0)  # what the LoRA Loader does first
    train_lora(model, examples, tmp_path / "cut", quick(steps=5, save_every=100), resume=tmp_path / "cut")
    fw, fc = factors(tmp_path / "whole"), factors(tmp_path / "cut")
    assert all(torch.equal(fw[k], fc[k]) for k in fw)


def test_training_leaves_the_model_as_it_was(tmp_path, data, model):
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    hooks = sum(len(m._forward_hooks) for m in model.net.modules())
    train_lora(model, read_folder(data, model.config), tmp_path / "a", quick(steps=1))
    after = model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(len(m._forward_hooks) for m in model.net.modules()) == hooks
    assert model.net.language_model.model.gradient_checkpointing is False


def test_the_saved_adapter_merges_into_what_training_computed(tmp_path, data, model):
    """The merged weight W + scale * B @ A gives each adapted layer's output with the training hook on."""
    from bagel_model.training.adapters import Adapters, LoraShape

    examples = read_folder(data, model.config)
    with pytest.raises(ValueError, match="1 understanding example.s. cannot train the generation expert"):
        train_lora(model, examples, tmp_path / "a", quick(targets="gen"))
    train_lora(model, examples, tmp_path / "a", quick(targets="all"))
    adapters = Adapters(model.net, ("gen", "und"), LoraShape(4, 4.0), seed=0)
    adapters.load(tmp_path / "a")
    merged = lora.apply(model, lora.read(tmp_path / "a"))
    x = torch.randn(5, model.config.llm.hidden_size)
    name = "language_model.model.layers.1.self_attn.q_proj_moe_gen"
    adapters.attach()
    try:
        hooked = model.net.get_submodule(name)(x)
    finally:
        adapters.detach()
    torch.testing.assert_close(merged.net.get_submodule(name)(x), hooked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.net.get_submodule(name)(x), hooked)
    config = json.loads((tmp_path / "a" / lora.CONFIG_FILE).read_text())
    assert config["r"] == 4 and {"q_proj_moe_gen", "mlp.down_proj"} <= set(config["target_modules"])
    assert all(k.startswith("base_model.model.language_model.model.layers.") for k in factors(tmp_path / "a"))


def test_gradient_checkpointing_gives_the_same_training(tmp_path, data, model):
    examples = read_folder(data, model.config)
    train_lora(model, examples, tmp_path / "on", quick(steps=2))
    train_lora(model, examples, tmp_path / "off", quick(steps=2, gradient_checkpointing=False))
    on, off = factors(tmp_path / "on"), factors(tmp_path / "off")
    assert all(torch.allclose(on[k], off[k], atol=1e-6) for k in on)


def test_a_quantized_base_trains_qlora(tmp_path, data):
    fp8 = bagel_model.load(default_model_dir(), weights="fp8")
    result = train_lora(fp8, read_folder(data, fp8.config), tmp_path / "q", quick(steps=2))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert any(v.abs().max() > 0 for k, v in factors(tmp_path / "q").items() if "lora_B" in k)


def test_resuming_with_other_settings_is_refused(tmp_path, data, model):
    examples = read_folder(data, model.config)
    train_lora(model, examples, tmp_path / "a", quick(steps=1))
    with pytest.raises(ValueError, match=r"other settings \(lr 0.001\)"):
        train_lora(model, examples, tmp_path / "a", quick(lr=2e-3), resume=tmp_path / "a")
    with pytest.raises(ValueError, match="rank 4 and scale 1, not rank 8"):
        train_lora(model, examples, tmp_path / "b", quick(rank=8, alpha=8.0), resume=tmp_path / "a")


def test_cli_trains_an_adapter_the_lora_option_then_takes(tmp_path, data, capsys):
    out = tmp_path / "adapter"
    code = main(
        ["train-lora", "--data", str(data), "--out", str(out), "--steps", "2", "--rank", "4", "--json"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 2 and report["adapter"] == str(out / lora.WEIGHTS_FILE)
    image = tmp_path / "x.png"
    args = ["generate", "--prompt", "a crimson circle at the top", "--lora", str(out), "--out", str(image)]
    assert main([*args, "--steps", "2"]) == 0
    assert image.is_file()


def test_cli_names_the_bad_data_and_exits_2(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"broken")
    (tmp_path / "a.txt").write_text("caption")
    assert main(["train-lora", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "a.png: cannot be read as an image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
