"""Offload and device maps through accelerate, on the CPU: accelerate's disk offload moves every weight
that fits no budget to files and back for each forward, the hardest case the same code path meets."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bagel_model
from bagel_model import offload
from bagel_model.bundled import default_model_dir
from bagel_model.sampling import FlowSettings

pytest.importorskip("accelerate")

P = "a red circle at the top left, a blue square at the center"
FAST = FlowSettings(num_steps=6)


def test_disk_offload_gives_the_resident_image_and_answer(tmp_path, pixels):
    resident = bagel_model.load(default_model_dir())
    offloaded = bagel_model.load(default_model_dir(), max_memory={"cpu": "4MiB"}, offload_folder=tmp_path)
    assert "disk" in offloaded.net.hf_device_map.values()  # most layers really left memory
    out = bagel_model.generate_images(resident, P, settings=FAST, seed=2)
    a, ctx_a = out.images[0], out.contexts[0]
    out = bagel_model.generate_images(offloaded, P, settings=FAST, seed=2)
    b, ctx_b = out.images[0], out.contexts[0]
    assert np.abs(pixels(a) - pixels(b)).max() <= 1
    question = "what color is the circle?"
    assert (
        bagel_model.understand(resident, question, context=ctx_a)[0]
        == bagel_model.understand(offloaded, question, context=ctx_b)[0]
    )


def test_cli_max_memory_offloads_to_disk(tmp_path, pixels, capsys):
    from bagel_model import cli

    common = ("generate", "--prompt", P, "--steps", 6, "--seed", 2, "--json")
    cli.main([str(a) for a in (*common, "--out", tmp_path / "resident.png")])
    argv = (
        *common,
        "--out",
        tmp_path / "disk.png",
        "--max-memory",
        "cpu=4MiB",
        "--offload-folder",
        tmp_path / "off",
    )
    assert cli.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["image"] == str(tmp_path / "disk.png")
    assert np.abs(pixels(tmp_path / "resident.png") - pixels(tmp_path / "disk.png")).max() <= 1


def test_bad_budgets_and_maps_name_the_fix(tmp_path):
    with pytest.raises(offload.OffloadError, match="must be DEVICE=SIZE"):
        offload.parse_memory(["cuda:0"])
    with pytest.raises(offload.OffloadError, match="device 'gpu' is unknown"):
        offload.parse_memory(["gpu=3GiB"])
    assert offload.parse_memory(["cuda:1=20GiB", "cpu=64GiB"]) == {1: "20GiB", "cpu": "64GiB"}
    with pytest.raises(offload.OffloadError, match="give an offload folder"):
        bagel_model.load(default_model_dir(), max_memory={"cpu": "4MiB"})
    with pytest.raises(bagel_model.CheckpointError, match="cannot be combined with a device map"):
        bagel_model.load(default_model_dir(), device_map="auto", weights="fp8")


def test_a_map_on_a_container_is_split_to_what_the_model_runs(tiny_model):
    """`language_model` has no forward of its own: its entry becomes its children's."""
    split = offload._split_containers({"language_model": "cpu", "vae2llm": "cpu"}, tiny_model.net)
    assert "language_model" not in split and split["language_model.lm_head"] == "cpu"
    assert split["language_model.model.layers.0"] == "cpu"  # a decoder layer stays whole
    assert split["language_model.model.embed_tokens"] == "cpu" and split["vae2llm"] == "cpu"


@pytest.mark.parametrize(
    ("strategy", "balanced"),
    [("auto", False), ("balanced", False), ("balanced_low_0", True), ("sequential", None)],
)
def test_each_map_strategy_is_what_accelerate_means_by_it(tmp_path, monkeypatch, strategy, balanced):
    """auto / balanced spread the GPU budgets evenly first, balanced_low_0 keeps GPU 0 light, sequential
    fills the budgets in order (the same call for all four was accepted and ignored before)."""
    import accelerate

    calls = []
    real = accelerate.utils.get_balanced_memory

    def recording(*args, low_zero=False, **kwargs):
        calls.append(low_zero)
        return real(*args, low_zero=low_zero, **kwargs)

    monkeypatch.setattr(accelerate.utils, "get_balanced_memory", recording)
    model = bagel_model.load(
        default_model_dir(), device_map=strategy, max_memory={"cpu": "4MiB"}, offload_folder=tmp_path
    )
    assert "disk" in model.net.hf_device_map.values()
    assert calls == ([] if balanced is None else [balanced])
    with pytest.raises(
        offload.OffloadError, match="'balance' is unknown; use auto, balanced, balanced_low_0"
    ):
        bagel_model.load(default_model_dir(), device_map="balance")
