"""`python -m bagel_model`: every command on the tiny random checkpoint, each result equal to the library's,
and user errors as one line on stderr with exit status 2.

Most commands run in-process through `cli.main` (a fresh interpreter costs seconds of imports each); the
real entry point runs as a subprocess for `make-tiny` and for one error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bagel_model import cli, tasks
from bagel_model.sampling import EDIT_SETTINGS, FlowSettings
from bagel_model.shapes import navigation_consistent, parse_description, read_scene, scene_matches

ROOT = Path(__file__).resolve().parents[1]
P = "a red circle at the top left, a blue square at the center"


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys, *argv) -> dict:
    rc, out, err = _run(capsys, *argv, "--json")
    assert rc == 0, err
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory, picture) -> Path:
    path = tmp_path_factory.mktemp("cli_inputs") / "shapes.png"
    picture.save(path)
    return path


def _subprocess(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bagel_model", *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- commands -----------------------------------------------------------------------------------------


def test_make_tiny(tmp_path, tiny_dir):
    proc = _subprocess("make-tiny", tmp_path / "m", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"model": str(tmp_path / "m")}
    for name in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "tokenizer.json"):
        assert (tmp_path / "m" / name).is_file()
    # the same seed writes the same checkpoint as the library's make_tiny
    assert (tmp_path / "m" / "ema.safetensors").read_bytes() == (tiny_dir / "ema.safetensors").read_bytes()


def test_understand(capsys, tiny_dir, tiny_model, picture_file):
    out = _json(
        capsys, "understand", "--model", tiny_dir, "--image", picture_file, "--prompt", "describe the image.",
        "--max-new-tokens", 4,
    )  # fmt: skip
    with Image.open(picture_file) as im:
        expected, _ = tasks.understand(
            tiny_model, "describe the image.", image=im.convert("RGB"), settings=tasks.TextSettings(4)
        )
    assert out == {"text": expected, "stop": expected.stop}
    # without --json: one "key: value" line per value
    rc, text, _ = _run(capsys, "understand", "--model", tiny_dir, "--prompt", "hi", "--max-new-tokens", 2)
    assert rc == 0 and text.startswith("text: ")


def test_understand_past_the_window_stops_there(capsys, tmp_path, tiny_dir):
    """A model with a 40-position window: --max-new-tokens 200 answers what fits and says why it stopped
    (it used to decode all 200, then fail: "the context would reach position ...")."""
    narrow = tmp_path / "narrow"
    shutil.copytree(tiny_dir, narrow)
    config = json.loads((narrow / "llm_config.json").read_text())
    (narrow / "llm_config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    out = _json(
        capsys, "understand", "--model", narrow, "--prompt", "describe the image.", "--max-new-tokens", 200
    )
    assert out["stop"] == "window" and out["text"]


def test_generate(capsys, tmp_path, tiny_dir, tiny_model, pixels):
    path = tmp_path / "sub" / "t2i.png"
    out = _json(
        capsys, "generate", "--model", tiny_dir, "--prompt", P, "--out", path, "--width", 64, "--height", 64,
        "--steps", 3, "--seed", 2,
    )  # fmt: skip
    assert out["image"] == str(path) and "thought" not in out
    assert out["seconds"] >= 0
    with Image.open(path) as im:
        assert im.size == (64, 64)
    expected = tasks.generate_images(
        tiny_model, P, height=64, width=64, settings=FlowSettings(num_steps=3), seed=2
    ).images[0]
    assert np.array_equal(pixels(path), pixels(expected))


def test_generate_options_reach_the_sampler(capsys, tmp_path, tiny_dir, tiny_model, pixels):
    path = tmp_path / "t2i.png"
    _json(
        capsys, "generate", "--model", tiny_dir, "--prompt", P, "--out", path, "--width", 96, "--height", 64,
        "--steps", 3, "--cfg-text", 3.0, "--cfg-img", 1.5, "--cfg-interval", 0.0, 1.0,
        "--timestep-shift", 2.0, "--renorm-type", "channel", "--renorm-min", 0.1,
    )  # fmt: skip
    settings = FlowSettings(3, 3.0, 1.5, (0.0, 1.0), 2.0, "channel", 0.1)
    expected = tasks.generate_images(tiny_model, P, height=64, width=96, settings=settings).images[0]
    assert np.array_equal(pixels(path), pixels(expected))


def test_generate_with_latents(capsys, tmp_path, tiny_dir, tiny_model, pixels):
    latents = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(9))
    save_file({"latents": latents}, str(tmp_path / "noise.safetensors"))
    path = tmp_path / "t2i.png"
    _json(
        capsys, "generate", "--model", tiny_dir, "--prompt", P, "--out", path, "--width", 64, "--height", 64,
        "--steps", 3, "--latents", tmp_path / "noise.safetensors",
    )  # fmt: skip
    settings = FlowSettings(num_steps=3)
    expected = tasks.generate_images(
        tiny_model, P, height=64, width=64, settings=settings, latents=latents[None]
    ).images[0]
    seeded = tasks.generate_images(tiny_model, P, height=64, width=64, settings=settings, seed=0).images[0]
    assert np.array_equal(pixels(path), pixels(expected))
    assert not np.array_equal(pixels(path), pixels(seeded))


def test_generate_think(capsys, tmp_path, tiny_dir, tiny_model, pixels):
    path = tmp_path / "think.png"
    out = _json(
        capsys, "generate", "--model", tiny_dir, "--prompt", P, "--out", path, "--width", 64, "--height", 64,
        "--steps", 3, "--think", "--max-think-tokens", 4,
    )  # fmt: skip
    thought, ctx = tasks.think(tiny_model, P, settings=tasks.TextSettings(4))
    assert out["thought"] == thought and thought.strip()
    expected = tasks.generate_images(
        tiny_model, None, context=ctx, settings=FlowSettings(num_steps=3)
    ).images[0]
    assert np.array_equal(pixels(path), pixels(expected))


def test_edit(capsys, tmp_path, tiny_dir, tiny_model, picture_file, pixels):
    path = tmp_path / "edit.png"
    out = _json(
        capsys, "edit", "--model", tiny_dir, "--image", picture_file, "--prompt", "make the circle green",
        "--out", path, "--steps", 3,
    )  # fmt: skip
    assert out["image"] == str(path)
    with Image.open(picture_file) as im:
        source = im.convert("RGB")
    settings = FlowSettings(**{**vars(EDIT_SETTINGS), "num_steps": 3})
    expected = tasks.edit_images(tiny_model, [source], "make the circle green", settings=settings).images[0]
    assert expected.size == (64, 64)
    assert np.array_equal(pixels(path), pixels(expected))


def test_demo_runs_every_task_on_the_bundled_model(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    out = _json(capsys, "demo", "--out", out_dir)
    names = ["t2i", "think_t2i", "edit", "frame_1", "frame_2", "move_right", "move_down"]
    assert sorted(Path(p).name for p in out["images"].values()) == sorted(f"{n}.png" for n in names)
    read = {}
    for name in names:
        with Image.open(out_dir / f"{name}.png") as im:
            assert im.size == (48, 48)
            read[name] = read_scene(im)
    answers = json.loads((out_dir / "answers.json").read_text())
    assert answers == {"understand": out["text"], "think": out["thought"]}
    with Image.open(out_dir / "contact_sheet.png") as sheet:
        assert sheet.size == (160 * len(names), 160 + 28)
    assert out["contact_sheet"] == str(out_dir / "contact_sheet.png")
    # every task right, as the contact sheet shows it: the trained model draws what the demo asks for,
    # describes it, resolves the indirect prompt, edits, moves and navigates
    expected = {
        "t2i": "a red circle at the top left, a blue square at the center",
        "think_t2i": "a blue triangle at the center",
        "edit": "a green circle at the top left, a blue square at the center",
        "frame_1": "a red circle at the top, a blue square at the center",
        "frame_2": "a red circle at the top right, a blue square at the center",
    }
    for name, description in expected.items():
        assert scene_matches(read[name], parse_description(description)), name
    assert out["text"] == expected["t2i"]
    assert out["thought"].endswith(f"</think> {expected['think_t2i']}")
    assert navigation_consistent(read["t2i"], read["move_right"], "move right")
    assert navigation_consistent(read["move_right"], read["move_down"], "move down")


def test_bench_shapes_reports_same_shape_recolors_on_their_own(capsys, tmp_path):
    """The capability table has a row for recolors of one of two objects of a shape, beside the plain
    recolor row, with the edit target; a short run (2 cases, 8 steps) on the bundled model checks the
    table's form, not the model (the card's numbers are `--n 50` at 50 steps)."""
    table = _json(capsys, "bench-shapes", "--n", 2, "--steps", 8, "--out", tmp_path / "table.json")
    assert table == json.loads((tmp_path / "table.json").read_text())
    rows = {row["capability"]: row for row in table["rows"]}
    assert list(rows)[3:5] == ["editing: recolor", "editing: recolor, shape shared"]
    shared = rows["editing: recolor, shape shared"]
    assert shared["metric"] == rows["editing: recolor"]["metric"] and shared["target"] == 0.85
    assert shared["score"] in (0.0, 0.5, 1.0) and shared["met"] is (shared["score"] >= 0.85)
    assert "indirect prompts with thinking" not in rows  # --think adds it


# -- errors -------------------------------------------------------------------------------------------


def _assert_one_line_error(rc: int, out: str, err: str, *fragments: str) -> None:
    assert rc == 2
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


def test_error_unreadable_image(capsys, tmp_path, tiny_dir):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    rc, out, err = _run(capsys, "understand", "--model", tiny_dir, "--image", bad, "--prompt", "hi")
    _assert_one_line_error(rc, out, err, f"image {bad} cannot be read as an image")
    rc, out, err = _run(
        capsys, "edit", "--model", tiny_dir, "--image", tmp_path / "missing.png", "--prompt", "x", "--out",
        tmp_path / "o.png",
    )  # fmt: skip
    _assert_one_line_error(rc, out, err, "missing.png does not exist")


@pytest.mark.parametrize("weights", ["nf4", "int8"])
def test_error_bitsandbytes_missing(capsys, monkeypatch, tiny_dir, weights):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    rc, out, err = _run(capsys, "understand", "--model", tiny_dir, "--prompt", "hi", "--weights", weights)
    _assert_one_line_error(rc, out, err, "need the bitsandbytes package: pip install bitsandbytes", "'fp8'")


def test_error_width_not_a_multiple_of_16(capsys, tmp_path, tiny_dir):
    path = tmp_path / "o.png"
    rc, out, err = _run(
        capsys, "generate", "--model", tiny_dir, "--prompt", P, "--out", path, "--width", 70, "--height", 64,
        "--steps", 2,
    )  # fmt: skip
    _assert_one_line_error(rc, out, err, "width 70 must be a multiple of 16")
    assert not path.exists()


def test_error_bad_steps(capsys, tmp_path, tiny_dir):
    rc, out, err = _run(
        capsys, "generate", "--model", tiny_dir, "--prompt", P, "--out", tmp_path / "o.png", "--steps", 1
    )
    _assert_one_line_error(rc, out, err, "steps must be at least 2")


def test_error_missing_model_folder(capsys, tmp_path):
    rc, out, err = _run(capsys, "understand", "--model", tmp_path / "nowhere", "--prompt", "hi")
    _assert_one_line_error(rc, out, err, f"model folder {tmp_path / 'nowhere'} does not exist")


def test_error_latents_file(capsys, tmp_path, tiny_dir):
    save_file({"noise": torch.zeros(16, 8, 8)}, str(tmp_path / "wrong.safetensors"))
    args = ["generate", "--model", tiny_dir, "--prompt", P, "--out", tmp_path / "o.png", "--steps", 2]
    rc, out, err = _run(capsys, *args, "--latents", tmp_path / "wrong.safetensors")
    _assert_one_line_error(rc, out, err, "holds ['noise'], not a tensor named 'latents'")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    rc, out, err = _run(capsys, *args, "--latents", tmp_path / "junk.safetensors")
    _assert_one_line_error(rc, out, err, "is not a readable safetensors file")
    save_file({"latents": torch.zeros(16, 8, 9)}, str(tmp_path / "shape.safetensors"))
    rc, out, err = _run(
        capsys, *args, "--width", 64, "--height", 64, "--latents", tmp_path / "shape.safetensors"
    )
    _assert_one_line_error(rc, out, err, "latents have shape [16, 8, 9], expected [16, 8, 8]")


def test_error_exit_status_of_the_entry_point(tmp_path):
    proc = _subprocess("understand", "--model", tmp_path / "nowhere", "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: model folder")


def test_sequence(capsys, tmp_path, tiny_dir, tiny_model, picture_file, pixels):
    """One prompt per frame, or one prompt repeated --frames times: the library's sequence, in order."""
    common = ("--model", tiny_dir, "--image", picture_file, "--steps", 3, "--seed", 4, "--json")
    out = _json(
        capsys, "sequence", *common, "--prompt", "move left", "--frames", 2, "--out-dir", tmp_path / "a"
    )
    assert out == {"images": [str(tmp_path / "a" / f"frame_{k:03d}.png") for k in range(2)]}
    listed = _json(
        capsys,
        "sequence",
        *common,
        "--prompt",
        "move left",
        "--prompt",
        "move left",
        "--out-dir",
        tmp_path / "b",
    )
    with Image.open(picture_file) as im:
        settings = replace(EDIT_SETTINGS, num_steps=3)
        (frames,), _ = tasks.generate_sequences(
            tiny_model, ["move left"] * 2, image=im.convert("RGB"), settings=settings, seed=4
        )
    for a, b, want in zip(out["images"], listed["images"], frames, strict=True):
        assert (pixels(a) == pixels(want)).all() and (pixels(b) == pixels(want)).all()
    rc, _, err = _run(
        capsys, "sequence", *common, "--prompt", "a", "--prompt", "b", "--frames", 3, "--out-dir", tmp_path
    )
    assert rc == 2 and "--frames repeats one --prompt; got 2 prompts" in err


def test_reason(capsys, tmp_path, tiny_dir, picture_file):
    """The tiny model writes no image request, so the loop ends after its first segment."""
    out = _json(
        capsys, "reason", "--model", tiny_dir, "--image", picture_file, "--prompt", "where is it?",
        "--max-new-tokens", 3, "--steps", 3, "--out-dir", tmp_path, "--json",
    )  # fmt: skip
    assert set(out) == {"answer", "stop", "transcript", "images"}
    assert out["stop"] in ("no_image_request", "max_new_tokens") and out["images"] == []


def test_fine_tune_folder_and_single_file_through_the_entry_point(capsys, tmp_path, pixels):
    """The real `python -m bagel_model generate` on the bundled model as a fine-tune folder (weights in
    model_bf16.safetensors, a config.json that is not JSON) and as a single file with --vae/--tokenizer: the
    bundled folder's image, each time."""
    from bagel_model.bundled import default_model_dir

    bundled = default_model_dir()
    folder = tmp_path / "fine-tune"
    folder.mkdir()
    configs = ("llm_config.json", "vit_config.json", "ae_config.json", "bagel_inference.json")
    for name in (*configs, "tokenizer.json", "ae.safetensors"):
        shutil.copy(bundled / name, folder / name)
    shutil.copy(bundled / "ema.safetensors", folder / "model_bf16.safetensors")
    (folder / "config.json").write_text("{'not': JSON}")
    single = tmp_path / "bagel-tiny.safetensors"
    shutil.copy(bundled / "ema.safetensors", single)
    model_configs = {name: json.loads((bundled / name).read_text()) for name in configs}
    metadata = {"format": "comfyui_bagel", "format_version": 1, "model_configs": model_configs}
    size = single.stat().st_size
    sidecar = {
        "format": "comfyui_bagel_sidecar",
        "format_version": 1,
        "checkpoint_size": size,
        "metadata": metadata,
    }
    (tmp_path / "bagel-tiny.safetensors.comfyui-bagel.json").write_text(json.dumps(sidecar))
    args = ["generate", "--prompt", P, "--seed", 4, "--steps", 5]
    expected = _json(capsys, *args, "--model", bundled, "--out", tmp_path / "bundled.png")["image"]
    parts = ["--vae", bundled / "ae.safetensors", "--tokenizer", bundled]
    for n, model in enumerate([["--model", folder], ["--model", single, *parts]]):
        proc = _subprocess(*args, *model, "--out", tmp_path / f"{n}.png", "--json")
        assert proc.returncode == 0, proc.stderr
        assert np.array_equal(pixels(json.loads(proc.stdout)["image"]), pixels(expected))
