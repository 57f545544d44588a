"""The ComfyUI nodes, called the way ComfyUI calls them, without ComfyUI.

The pack is imported as ComfyUI imports it (a package loaded from its folder's path, whose name is not a
valid module name), and every model comes through the Loader node: the bundled tiny model, sampling 3 steps
at its 48 px default size, so the whole file runs in seconds. ComfyUI itself is faked only where a test
needs to see what the nodes hand it (progress, interrupts, the memory manager); tests/comfyui/ runs a real
server.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import FAST, NODES, PACK, ROOT, bridge, defaults, hub, images, lib, loader, pack, run, tiny
from PIL import Image

SOCKETS = {"BAGEL_MODEL", "BAGEL_CONTEXT", "IMAGE", "LATENT"}


@pytest.fixture(scope="module")
def model():
    (managed,) = run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME)
    return managed


@pytest.fixture(scope="module")
def scene(model):
    """A generated image and its context, the start of most chains below."""
    return run("BAGELTextToImage", model=model, prompt="a red circle at the center")["result"][:2]


# -- registration and declared inputs -------------------------------------------------------------------


SAMPLER = [
    "steps",
    "cfg_text_scale",
    "cfg_img_scale",
    "cfg_interval_start",
    "cfg_interval_end",
    "timestep_shift",
    "cfg_renorm_type",
    "cfg_renorm_min",
]
TEXT = ["max_new_tokens", "do_sample", "temperature"]
# Every published node and its inputs in the order saved UI workflows store them (required, then optional):
# a node may only gain inputs after these.
PUBLISHED = {
    "BAGELLoader": [
        "model_name", "dtype", "attention", "download_if_missing", "repo_id", "weights", "vae_name"
    ],
    "BAGELUnderstand": ["model", "question", *TEXT, "seed", "image", "context"],
    "BAGELThink": ["model", "instruction", "mode", *TEXT, "seed", "image", "context"],
    "BAGELTextToImage": [
        "model", "prompt", "width", "height", "seed", *SAMPLER, "context", "step_cache", "batch_size"
    ],
    "BAGELEdit": [
        "model", "instruction", "seed", *SAMPLER, "image", "context", "step_cache", "batch_size", "latent"
    ],
    "BAGELMultiFrame": [
        "model", "prompt", "frames", "seed", *SAMPLER, "image", "context", "step_cache", "batch_size"
    ],
    "BAGELNavigate": ["model", "actions", "seed", *SAMPLER, "image", "context", "step_cache"],
    "BAGELContextAddText": ["model", "text", "context"],
    "BAGELContextAddImages": ["model", "images", "mode", "context"],
    "BAGELReason": [
        "model", "question", "mode", "max_rounds", *TEXT, "seed", *SAMPLER, "image", "context", "step_cache"
    ],
    "BAGELLoraLoader": ["model", "lora_name", "strength"],
}  # fmt: skip


def test_pack_registers_its_published_prefixed_nodes_and_a_web_folder():
    assert set(PUBLISHED) <= set(NODES)
    assert all(node_id.startswith("BAGEL") for node_id in NODES)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    assert all(name.startswith("BAGEL ") for name in pack.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert list((ROOT / pack.WEB_DIRECTORY).glob("*.js"))


@pytest.mark.parametrize("node_id", list(PUBLISHED))
def test_published_inputs_keep_their_names_and_order(node_id):
    spec = NODES[node_id].INPUT_TYPES()
    declared = [*spec["required"], *spec.get("optional", {})]
    assert declared[: len(PUBLISHED[node_id])] == PUBLISHED[node_id]


def test_pack_imports_by_path_with_nothing_on_sys_path(tmp_path):
    """As in ComfyUI: the folder's parent is not importable, so every import inside must be relative."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('x-y', {str(ROOT / '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['x-y'] = m; spec.loader.exec_module(m)\n"
        "print(len(m.NODE_CLASS_MAPPINGS))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(NODES))


@pytest.mark.parametrize("node_id", list(NODES))
def test_declared_inputs_and_outputs(node_id):
    cls = NODES[node_id]
    spec = cls.INPUT_TYPES()
    assert cls.CATEGORY.startswith("BAGEL") and cls.DESCRIPTION
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    for name, (kind, options) in {**spec["required"], **spec.get("optional", {})}.items():
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if name in spec["required"] and (isinstance(kind, list) or kind not in SOCKETS):
            assert "default" in options, f"{node_id}.{name} has no default"
        if isinstance(kind, list):
            assert options.get("default", kind[0]) in kind
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    if "sampler" in params:  # **sampler takes the sampler widgets
        params = {**params, **inspect.signature(pack.nodes.sockets.flow_settings).parameters}
    assert set(spec["required"]) <= set(params)
    for name in spec.get("optional", {}):
        assert params[name].default is not inspect.Parameter.empty


def test_seeds_span_comfyui_range_with_control_after_generate():
    for node_id, cls in NODES.items():
        seed = cls.INPUT_TYPES()["required"].get("seed")
        if seed is not None:
            assert seed[1]["min"] == 0 and seed[1]["max"] == 2**64 - 1, node_id
            assert seed[1]["control_after_generate"] is True


def test_sampler_defaults_are_the_official_ones():
    for node_id, official in [
        ("BAGELTextToImage", lib.T2I_SETTINGS),
        ("BAGELEdit", lib.EDIT_SETTINGS),
        ("BAGELMultiFrame", lib.EDIT_SETTINGS),
        ("BAGELNavigate", lib.EDIT_SETTINGS),
    ]:
        inputs = NODES[node_id].INPUT_TYPES()
        widgets = {**inputs["required"], **inputs["optional"]}
        flow_settings = pack.nodes.sockets.flow_settings
        knobs = inspect.signature(flow_settings).parameters
        assert flow_settings(**{k: widgets[k][1]["default"] for k in knobs}) == official, node_id


# -- every node, end to end -----------------------------------------------------------------------------


def test_text_to_image_returns_one_image_of_the_requested_size(model):
    out = run("BAGELTextToImage", model=model, prompt="a blue square at the top left", width=64, height=48)
    image, ctx, _ = out["result"]
    assert image.shape == (1, 48, 64, 3)
    assert out["ui"]["context"] == [ctx.summary()]


def test_size_zero_means_the_models_default(model, scene):
    default = model.model.config.inference
    assert scene[0].shape == (1, default.default_height, default.default_width, 3)


def test_understand_and_think_show_their_text_on_the_node(model, scene):
    image, ctx = scene
    out = run("BAGELUnderstand", model=model, question="how many shapes are there?", image=image)
    answer, answer_ctx = out["result"]
    assert out["ui"]["text"] == [answer] and out["ui"]["context"] == [answer_ctx.summary()]
    assert NODES["BAGELUnderstand"].OUTPUT_NODE and NODES["BAGELThink"].OUTPUT_NODE
    out = run(
        "BAGELThink",
        model=model,
        instruction="what color is the circle?",
        mode="reason-to-answer",
        context=ctx,
    )
    assert out["ui"]["text"] == [out["result"][0]]


def test_think_plan_then_generate_from_the_context_alone(model):
    thought, ctx = run(
        "BAGELThink", model=model, instruction="draw a shape with three corners", mode="plan-an-image"
    )["result"]
    image, after, _ = run("BAGELTextToImage", model=model, prompt="", context=ctx)["result"]
    assert image.shape[0] == 1 and after.tokens > ctx.tokens


def test_edit_chain_of_three_turns_continues_one_session(model, scene):
    image, ctx = scene
    tokens = [ctx.tokens]
    for instruction in (
        "make the circle green",
        "move the green circle to the top left",
        "add a blue square",
    ):
        edited, ctx, _ = run("BAGELEdit", model=model, instruction=instruction, context=ctx)["result"]
        assert edited.shape == image.shape
        tokens.append(ctx.tokens)
    assert tokens == sorted(tokens) and len(set(tokens)) == 4


def test_edit_of_a_given_image_keeps_its_size(model, scene):
    edited, *_ = run("BAGELEdit", model=model, instruction="remove the circle", image=scene[0])["result"]
    assert edited.shape == scene[0].shape


def test_multi_frame_repeats_one_line_and_navigate_makes_one_view_per_action(model, scene):
    image, ctx = scene
    frames, _ = run(
        "BAGELMultiFrame", model=model, prompt="the red circle moves right", frames=3, image=image
    )["result"]
    assert frames.shape == (3, *image.shape[1:])
    views, _ = run("BAGELNavigate", model=model, actions="move left\n\nmove up\n", context=ctx)["result"]
    assert views.shape == (2, *image.shape[1:])


def test_frame_prompts_fill_with_the_last_line():
    frame_prompts = pack.nodes.sequence.frame_prompts
    assert frame_prompts("a\nb", 4) == ["a", "b", "b", "b"]
    assert frame_prompts("only", 2) == ["only", "only"]


def test_largest_comfyui_seed_runs(model, scene):
    frames, _ = run("BAGELMultiFrame", model=model, frames=2, context=scene[1], seed=2**64 - 1)["result"]
    assert frames.shape[0] == 2


# -- the context is shared, never modified --------------------------------------------------------------


def test_one_context_feeding_two_edits_gives_what_two_separate_runs_give(model):
    def base():
        return run("BAGELTextToImage", model=model, prompt="a yellow triangle at the left")["result"][1]

    shared = base()
    before = (shared.tokens, shared.summary(), shared.nbytes)
    green = run("BAGELEdit", model=model, instruction="make the triangle green", context=shared)["result"][0]
    gone = run("BAGELEdit", model=model, instruction="remove the triangle", context=shared)["result"][0]
    assert (shared.tokens, shared.summary(), shared.nbytes) == before
    assert not torch.equal(green, gone)

    assert torch.equal(
        green,
        run("BAGELEdit", model=model, instruction="make the triangle green", context=base())["result"][0],
    )
    assert torch.equal(
        gone, run("BAGELEdit", model=model, instruction="remove the triangle", context=base())["result"][0]
    )
    fresh = base()
    for kept, recomputed in zip(shared.cond.segments, fresh.cond.segments, strict=True):
        assert torch.equal(kept.kv.k, recomputed.kv.k) and torch.equal(kept.kv.v, recomputed.kv.v)


def test_same_inputs_same_outputs(model, scene):
    first = run("BAGELEdit", model=model, instruction="make the circle blue", context=scene[1], seed=7)[
        "result"
    ][0]
    again = run("BAGELEdit", model=model, instruction="make the circle blue", context=scene[1], seed=7)[
        "result"
    ][0]
    other = run("BAGELEdit", model=model, instruction="make the circle blue", context=scene[1], seed=8)[
        "result"
    ][0]
    assert torch.equal(first, again) and not torch.equal(first, other)


# -- errors a user can act on ---------------------------------------------------------------------------


def test_size_not_a_multiple_of_16_is_refused(model):
    with pytest.raises(ValueError, match="width 50 must be a multiple of 16"):
        run("BAGELTextToImage", model=model, prompt="a red circle", width=50, height=64)


def test_size_tooltips_name_each_models_limit_and_default():
    config = importlib.import_module(f"{PACK}.bagel_model.layout").read_config(
        lib.bundled.default_model_dir()
    )
    for side in ("width", "height"):
        kind, options = NODES["BAGELTextToImage"].INPUT_TYPES()["required"][side]
        assert options["max"] == 1024 and options["step"] == config.latent_downsample
        assert f"{config.max_image_side} for the bundled model" in options["tooltip"]  # the limit
        default = getattr(config.inference, f"default_{side}")
        assert f"{default} for the bundled model)" in options["tooltip"]  # the size 0 stands for
        assert "1024 for BAGEL-7B-MoT" in options["tooltip"]


def test_size_above_the_models_limit_is_refused_naming_the_input_and_the_limit(model):
    limit = model.model.config.max_image_side
    with pytest.raises(ValueError, match=rf"^width {limit + 16} must be .* and {limit}$"):
        run("BAGELTextToImage", model=model, prompt="a red circle", width=limit + 16, height=64)
    with pytest.raises(ValueError, match=rf"^height 1024 must be .* and {limit}$"):
        run("BAGELTextToImage", model=model, prompt="a red circle", width=64, height=1024)


@pytest.mark.parametrize("name", ["cfg_text_scale", "timestep_shift"])
@pytest.mark.parametrize("node_id", ["BAGELTextToImage", "BAGELEdit"])
def test_non_finite_sampler_values_from_the_api_are_refused_by_name(model, scene, node_id, name):
    """ComfyUI's min/max checks let NaN through (every comparison with NaN is False)."""
    inputs = {"prompt": "a red circle"} if node_id == "BAGELTextToImage" else {"instruction": "x"}
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got {value!r}$"):
            run(node_id, model=model, context=scene[1], **inputs, **{name: value})


def test_empty_prompt_needs_a_context(model):
    with pytest.raises(ValueError, match="prompt is empty and there is no context"):
        run("BAGELTextToImage", model=model, prompt="  ")


def test_image_batches_are_refused_with_a_way_out(model, scene):
    batch = scene[0].repeat(2, 1, 1, 1)
    for node_id, inputs in [
        ("BAGELUnderstand", {}),
        ("BAGELNavigate", {}),
        ("BAGELReason", {"question": "where is the circle?"}),
    ]:
        with pytest.raises(ValueError, match="batch of 2 images.*ImageFromBatch"):
            run(node_id, model=model, image=batch, **inputs)


def test_context_from_another_model_is_refused(model, scene):
    (other,) = run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME)
    with pytest.raises(lib.ContextError, match="built by another model"):
        run("BAGELEdit", model=other, instruction="make it blue", context=scene[1])


def test_missing_start_image_is_named(model):
    with pytest.raises(ValueError, match="edit needs an image"):
        run("BAGELEdit", model=model, instruction="make it blue")
    with pytest.raises(ValueError, match="Navigate needs a starting view"):
        run("BAGELNavigate", model=model)


def test_more_prompt_lines_than_frames_is_refused(model, scene):
    with pytest.raises(ValueError, match="3 lines but frames is 2"):
        run("BAGELMultiFrame", model=model, prompt="a\nb\nc", frames=2, context=scene[1])


def test_sampler_values_the_library_rejects_are_named(model, scene):
    with pytest.raises(ValueError, match="cfg_interval"):
        run(
            "BAGELEdit",
            model=model,
            instruction="x",
            context=scene[1],
            cfg_interval_start=0.9,
            cfg_interval_end=0.1,
        )


# -- loader ---------------------------------------------------------------------------------------------


def test_loader_lists_bundled_first_then_model_folders(tmp_path, monkeypatch):
    (tmp_path / "BAGEL-7B-MoT").mkdir()
    (tmp_path / "BAGEL-7B-MoT" / "ema.safetensors").touch()
    (tmp_path / "not-a-model").mkdir()
    monkeypatch.setattr(bridge, "model_roots", lambda: [tmp_path])
    names = NODES["BAGELLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert names == [lib.bundled.DEFAULT_NAME, "BAGEL-7B-MoT"]


def no_fetch(repo_id, folder, timeout):
    raise AssertionError(f"{repo_id} was fetched")


def test_loader_loads_a_model_folder_and_never_downloads_one_that_is_there(tmp_path, monkeypatch):
    tiny.make_tiny(tmp_path / "tiny", seed=1)
    monkeypatch.setattr(bridge, "model_roots", lambda: [tmp_path])
    (managed,) = run("BAGELLoader", model_name="tiny", dtype="float32")
    assert managed.model.source == tmp_path / "tiny" and managed.model.dtype == torch.float32
    tiny.make_tiny(tmp_path / "o--tiny", seed=1)
    monkeypatch.setattr(hub, "fetch", no_fetch)
    (managed,) = run(
        "BAGELLoader", model_name=lib.bundled.DEFAULT_NAME, download_if_missing=True, repo_id="o/tiny"
    )
    assert managed.model.source == tmp_path / "o--tiny"


def test_loader_errors_name_the_fix():
    with pytest.raises(FileNotFoundError, match="'nope' was not found.*download_if_missing"):
        run("BAGELLoader", model_name="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash-attn"):
            run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME, attention="flash")


def test_dtype_choices_are_one_table_for_the_loader_and_the_cli():
    checkpoint = importlib.import_module(f"{PACK}.bagel_model.checkpoint")
    assert NODES["BAGELLoader"].INPUT_TYPES()["required"]["dtype"][0] == list(checkpoint.DTYPE_CHOICES)
    parser = importlib.import_module(f"{PACK}.bagel_model.cli").build_parser()
    for name in checkpoint.DTYPE_CHOICES:
        assert parser.parse_args(["understand", "--prompt", "x", "--dtype", name]).dtype == name
    assert checkpoint.resolve_dtype("auto", "cpu") == torch.float32
    assert checkpoint.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert checkpoint.resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype 'double' is unknown; choose one of auto, bfloat16"):
        checkpoint.resolve_dtype("double", "cpu")


# -- the download switch (no network: a local server that never answers, or a fake fetch) ----------------


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty models/bagel folder as ComfyUI's only one."""
    root = tmp_path / "bagel"
    root.mkdir()
    monkeypatch.setattr(bridge, "model_roots", lambda: [root])
    return root


@pytest.fixture
def silent_hub(monkeypatch):
    """HF_ENDPOINT at a local port that accepts connections and never answers (a stalled network)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nothing is ever read or written
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DOWNLOAD_TIMEOUT"):
            monkeypatch.delenv(name, raising=False)
        yield


def within(seconds: float, call):
    """call(), failing (instead of hanging the suite) if it has not returned or raised after `seconds`."""
    done: dict = {}

    def target():
        try:
            done["value"] = call()
        except BaseException as e:
            done["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in done:
        raise done["error"]
    return done["value"], time.monotonic() - start


def load_downloading(repo_id: str):
    return run("BAGELLoader", model_name=lib.bundled.DEFAULT_NAME, download_if_missing=True, repo_id=repo_id)


def test_download_from_a_server_that_never_answers_ends_with_the_way_out(models_dir, silent_hub, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with pytest.raises(hub.DownloadError) as failed:
        within(120, lambda: load_downloading("someone/BAGEL-x"))
    message = str(failed.value)
    assert "did not answer within 1 s" in message
    assert "turn download_if_missing off" in message and str(models_dir / "someone--BAGEL-x") in message


def test_download_while_hugging_face_is_switched_off_says_so(models_dir, silent_hub, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.DownloadError, match="HF_HUB_OFFLINE is set.*turn download_if_missing off"):
        within(120, lambda: load_downloading("someone/BAGEL-x"))


def test_download_stops_at_once_when_comfyui_cancels(models_dir, silent_hub, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "600")
    children, start_child = [], subprocess.Popen

    def popen(*args, **kwargs):
        children.append(start_child(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(hub.subprocess, "Popen", popen)
    modules, _ = fake_comfy(interrupt_at=3)  # Cancel at the third check, after about half a second
    start = time.monotonic()
    with mock.patch.dict(sys.modules, modules), pytest.raises(Interrupted):
        within(120, lambda: load_downloading("someone/BAGEL-x"))
    assert time.monotonic() - start < 30  # far within the 600 s the server is given
    (child,) = children
    assert child.poll() is not None  # the download was stopped, not left running behind the queue


@pytest.mark.parametrize("damaged", ["ema.safetensors", "llm_config.json"])
def test_download_fetches_a_truncated_file_again(models_dir, tmp_path, monkeypatch, damaged):
    good = tiny.make_tiny(tmp_path / "good", seed=1)
    folder = tiny.make_tiny(models_dir / "o--tiny", seed=1)
    data = (folder / damaged).read_bytes()
    (folder / damaged).write_bytes(data[: len(data) // 2])
    fetched = []

    def fetch(repo_id, target, timeout):
        fetched.append((repo_id, target, (target / damaged).exists()))
        shutil.copy(good / damaged, target / damaged)

    monkeypatch.setattr(hub, "fetch", fetch)
    (managed,) = load_downloading("o/tiny")
    assert fetched == [("o/tiny", folder, False)]  # the damaged file was removed, so the hub fetches it anew
    assert managed.model.source == folder


def test_download_folder_is_unique_per_repo_id(models_dir, monkeypatch):
    fetched = []

    def fetch(repo_id, target, timeout):
        fetched.append(repo_id)
        tiny.make_tiny(target, seed=len(fetched))

    monkeypatch.setattr(hub, "fetch", fetch)
    (a,), (b,) = load_downloading("a/x"), load_downloading("b/x")
    assert fetched == ["a/x", "b/x"]
    assert (a.model.source, b.model.source) == (models_dir / "a--x", models_dir / "b--x")
    names = NODES["BAGELLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert names == [lib.bundled.DEFAULT_NAME, "a--x", "b--x"]  # listed, so they load with the switch off


def test_download_refuses_a_repo_id_that_is_not_one(models_dir, monkeypatch):
    monkeypatch.setattr(hub, "fetch", no_fetch)
    for bad in ("../../etc", "a/b/c", "a--b/c", "", "a/.."):
        with pytest.raises(
            hub.DownloadError, match="not a Hugging Face repository id: write it as owner/name"
        ):
            load_downloading(bad)


def comfy_type_name(cls: type) -> str:
    """How ComfyUI names an error's type in its UI and API (`full_type_name` in its execution.py, 0.3.64)."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def test_comfyui_names_our_errors_by_class_only():
    # ComfyUI imports the pack by its path, so the module would read /.../custom_nodes/comfyui-bagel-mot...
    ours = {
        value
        for name, module in list(sys.modules.items())
        if name.startswith(f"{PACK}.")
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ in (name, "builtins")
    }
    assert {lib.lora.LoraError, lib.ContextError, lib.CheckpointError, hub.DownloadError} <= ours
    assert sorted(comfy_type_name(cls) for cls in ours) == sorted(cls.__qualname__ for cls in ours)


# -- IMAGE conversion -----------------------------------------------------------------------------------


def test_image_round_trip_is_exact_and_other_channel_counts_are_read():
    pixels = torch.randint(0, 256, (1, 5, 7, 3), dtype=torch.uint8)
    image = pixels.float() / 255
    pil = images.to_pil(image)
    assert pil.size == (7, 5) and torch.equal(images.to_image([pil]), image)
    assert (
        images.to_pil(image[..., :1]).mode == "L"
        and images.to_pil(torch.cat([image, image[..., :1]], -1)).mode == "RGBA"
    )
    with pytest.raises(ValueError, match="different sizes"):
        images.to_image([Image.new("RGB", (4, 4)), Image.new("RGB", (8, 4))])


# -- what the nodes hand ComfyUI (faked here; tests/comfyui/ runs the real thing) ---------------------


class Interrupted(Exception):
    pass


def fake_comfy(interrupt_at: int | None = None) -> tuple[dict, list]:
    """Stand-ins for comfy.utils / comfy.model_management recording progress bars; one can interrupt."""
    bars: list = []
    calls = {"n": 0}

    class ProgressBar:
        def __init__(self, total):
            self.total, self.values, self.totals = total, [], []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append(value)
            self.totals.append(self.total if total is None else total)

    def check():
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise Interrupted

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = check
    return {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm}, bars


def test_progress_joins_the_frames_into_one_bar(model, scene):
    modules, bars = fake_comfy()
    with mock.patch.dict(sys.modules, modules):
        run("BAGELMultiFrame", model=model, frames=2, context=scene[1], steps=4)
    (bar,) = bars
    assert bar.total == 6 and bar.values == [1, 2, 3, 4, 5, 6]  # 2 frames x 3 evaluated steps


def test_interrupt_stops_within_a_step_and_leaves_the_context_usable(model, scene):
    ctx = scene[1]
    before = ctx.summary()
    modules, bars = fake_comfy(interrupt_at=2)
    with mock.patch.dict(sys.modules, modules), pytest.raises(Interrupted):
        run("BAGELEdit", model=model, instruction="make it blue", context=ctx, steps=20)
    assert bars[0].values == [1]
    assert ctx.summary() == before
    run("BAGELEdit", model=model, instruction="make it blue", context=ctx)


@pytest.mark.parametrize("weights", ["native", "fp8"])
def test_model_is_handed_to_comfyuis_memory_manager(model, weights):
    """The patcher holds the model itself; native weights may be loaded partly (ComfyUI decides),
    quantized ones, whose layers cannot cast, are loaded fully."""
    loads = []
    patcher_module = types.ModuleType("comfy.model_patcher")
    patcher_module.ModelPatcher = lambda module, load_device, offload_device: types.SimpleNamespace(
        model=module, load_device=load_device, offload_device=offload_device
    )
    mm = types.ModuleType("comfy.model_management")
    mm.load_models_gpu = lambda models, force_full_load: loads.append((models, force_full_load))
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    modules = {"comfy": comfy, "comfy.model_patcher": patcher_module, "comfy.model_management": mm}
    cpu = torch.device("cpu")
    loaded = (
        model.model if weights == "native" else lib.load(lib.bundled.default_model_dir(), weights=weights)
    )
    with mock.patch.dict(sys.modules, modules):
        managed = bridge.manage(loaded, cpu, cpu)
        assert managed.ready() is loaded
    assert managed.patcher.model is loaded and managed.patcher.load_device == cpu
    assert loads == [([managed.patcher], weights != "native")]


# -- example workflows agree with the nodes -------------------------------------------------------------


WORKFLOWS = ROOT / "example_workflows"


def widget_names(node_id: str) -> list[str]:
    """Widget inputs in the order a UI workflow stores them, the seed followed by its control slot."""
    spec = NODES[node_id].INPUT_TYPES()
    names = []
    for name, (kind, options) in {**spec["required"], **spec.get("optional", {})}.items():
        if isinstance(kind, list) or kind not in SOCKETS:
            names.append(name)
            if options.get("control_after_generate"):
                names.append(None)
    return names


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_ui_workflow_matches_its_api_twin_and_has_a_thumbnail(path):
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / "api" / path.name).read_text())
    assert (WORKFLOWS / f"{path.stem}.jpg").is_file() or (WORKFLOWS / f"{path.stem}.png").is_file()
    ours = [node for node in ui["nodes"] if node["type"] in NODES]
    assert ours and {str(n["id"]) for n in ours} <= set(api)
    for node in ours:
        names = widget_names(node["type"])
        assert len(node["widgets_values"]) == len(names), f"{path.name} node {node['id']}"
        inputs = api[str(node["id"])]["inputs"]
        for name, value in zip(names, node["widgets_values"], strict=True):
            if name is None:
                assert value in ("fixed", "increment", "decrement", "randomize")
            else:
                assert inputs[name] == value, f"{path.name} node {node['id']} {name}"


@pytest.mark.parametrize("path", sorted((WORKFLOWS / "api").glob("*.json")), ids=lambda p: p.stem)
def test_api_workflow_gives_every_required_input_of_our_nodes(path):
    for node_id, node in json.loads(path.read_text()).items():
        if node["class_type"] in NODES:
            required = NODES[node["class_type"]].INPUT_TYPES()["required"]
            missing = set(required) - set(node["inputs"])
            assert not missing, f"{path.name} node {node_id} lacks {missing}"


# -- batches ----------------------------------------------------------------------------------------------


def sampler_settings(node_id: str):
    """The library settings a node samples with at its defaults (and FAST's steps)."""
    flow_settings = pack.nodes.sockets.flow_settings
    knobs = inspect.signature(flow_settings).parameters
    return flow_settings(**{k: v for k, v in defaults(node_id).items() if k in knobs})


@pytest.fixture(scope="module")
def two_scenes(model):
    """Two generated images (the default size) as one IMAGE batch."""
    first = run("BAGELTextToImage", model=model, prompt="a red circle at the top left")["result"][0]
    second = run("BAGELTextToImage", model=model, prompt="a blue square at the bottom right")["result"][0]
    return torch.cat([first, second])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Pixels within 1/255 (a batch runs the same passes side by side: float rounding may differ)."""
    return a.shape == b.shape and bool(((a - b).abs() <= 1 / 255 + 1e-6).all())


def test_text_to_image_batch_equals_one_by_one_from_consecutive_seeds(model):
    prompt = "a green triangle at the center"
    batch, ctx, latent = run("BAGELTextToImage", model=model, prompt=prompt, seed=5, batch_size=3)["result"]
    assert batch.shape[0] == 3 and latent["samples"].shape[0] == 3
    for b in range(3):
        single, single_ctx, single_latent = run("BAGELTextToImage", model=model, prompt=prompt, seed=5 + b)[
            "result"
        ]
        assert close(batch[b : b + 1], single)
        assert torch.allclose(latent["samples"][b : b + 1], single_latent["samples"], atol=1e-4)
        if b == 0:  # the context output continues the first item
            assert ctx.summary() == single_ctx.summary()
    assert not torch.equal(batch[0], batch[1])


def test_edit_batches_equal_one_by_one(model, scene, two_scenes):
    instruction = "make the circle green"

    def edit(**inputs):
        return run("BAGELEdit", model=model, instruction=instruction, **inputs)["result"][0]

    each = edit(image=two_scenes, seed=4)  # an IMAGE batch: each image, image b with seed + b
    assert close(each[:1], edit(image=two_scenes[:1], seed=4))
    assert close(each[1:], edit(image=two_scenes[1:], seed=5))
    repeated = edit(image=scene[0], seed=4, batch_size=2)  # one image, two seeds
    assert close(repeated[1:], edit(image=scene[0], seed=5)) and not torch.equal(repeated[0], repeated[1])
    latest = edit(context=scene[1], seed=4, batch_size=2)  # the context's latest image, two seeds
    assert close(latest[1:], edit(context=scene[1], seed=5))
    with pytest.raises(ValueError, match="2 images to edit and batch_size 3: .* set batch_size to 1"):
        edit(image=two_scenes, batch_size=3)


def test_multi_frame_batch_returns_every_sequence_item_after_item(model, scene):
    inputs = {"model": model, "frames": 2, "image": scene[0], "seed": 9}
    frames, ctx = run("BAGELMultiFrame", **inputs, batch_size=2)["result"]
    first, first_ctx = run("BAGELMultiFrame", **inputs)["result"]
    second, _ = run("BAGELMultiFrame", **{**inputs, "seed": 10})["result"]
    assert frames.shape[0] == 4
    assert close(frames[:2], first) and close(frames[2:], second)
    assert ctx.summary() == first_ctx.summary()


# -- LATENT ------------------------------------------------------------------------------------------------


def test_latent_output_is_the_autoencoders_raw_space_and_decodes_to_the_image(model):
    bagel = model.model
    prompt = "a red circle at the center"
    image, _, latent = run("BAGELTextToImage", model=model, prompt=prompt, seed=1)["result"]
    library = lib.generate_images(bagel, prompt, settings=sampler_settings("BAGELTextToImage"), seed=1)
    samples = latent["samples"]
    assert torch.allclose(samples, bagel.vae.to_raw(library.latents), atol=1e-6)
    assert torch.allclose(bagel.vae.from_raw(samples), library.latents, atol=1e-5)
    # What VAE Decode does with a LATENT: the autoencoder's decoder on it as it is, then (x + 1) / 2.
    with torch.no_grad():
        decoded = bagel.vae.decoder(samples.to(bagel.vae.dtype))
    pixels = ((decoded.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert (pixels - image).abs().max() <= 1 / 255


def test_edit_of_a_latent_uses_it_as_is_for_the_image_tokens(model):
    bagel = model.model
    _, _, latent = run("BAGELTextToImage", model=model, prompt="a red circle at the center", seed=1)["result"]
    edited, ctx, out_latent = run(
        "BAGELEdit", model=model, instruction="make it blue", latent=latent, seed=6
    )["result"]
    z = bagel.vae.from_raw(latent["samples"])[0]
    expected_ctx = lib.Context.empty(bagel).append_image(bagel.decode_latent(z), latent=z)
    settings = sampler_settings("BAGELEdit")
    expected = lib.edit_images(
        bagel, None, "make it blue", context=expected_ctx, settings=settings, seed=6
    ).images[0]
    assert torch.equal(edited, images.to_image([expected]))
    assert [s.kind for s in ctx.cond.segments] == ["vae", "vit", "text", "vae", "vit"]
    assert out_latent["samples"].shape == latent["samples"].shape


def test_edit_of_a_latent_batch_edits_each_and_a_latent_of_another_size_is_named(model):
    _, _, latent = run("BAGELTextToImage", model=model, prompt="a red circle", seed=1, batch_size=2)["result"]
    both, *_ = run("BAGELEdit", model=model, instruction="make it blue", latent=latent, seed=3)["result"]
    second, *_ = run(
        "BAGELEdit",
        model=model,
        instruction="make it blue",
        latent={"samples": latent["samples"][1:]},
        seed=4,
    )["result"]
    assert both.shape[0] == 2 and close(both[1:], second)
    # The bundled model takes 48 px pictures only (its one-token-per-cell geometry): a latent is used as it
    # is, never resized, so a larger one is refused with the size it would need.
    upscaled = {"samples": torch.nn.functional.interpolate(latent["samples"][:1], scale_factor=2.0)}
    with pytest.raises(ValueError, match="latent of 96x96 pixels is outside .* resized to 48x48"):
        run("BAGELEdit", model=model, instruction="make it blue", latent=upscaled)


def test_an_edit_latent_is_sized_before_it_is_decoded_and_other_errors_keep_their_words(model, monkeypatch):
    """An upscaled 4096² latent was decoded first (274 GB asked of the CPU) and only then refused, and
    every context error on this path got the Upscale Latent hint, even 'built by another model'."""
    _, ctx, latent = run("BAGELTextToImage", model=model, prompt="a red circle", seed=1)["result"]
    decoded = []
    monkeypatch.setattr(type(model.model), "decode_latent", lambda self, z: decoded.append(z) or 1 / 0)
    big = {"samples": torch.zeros(1, model.model.config.latent_channels, 512, 512)}
    with pytest.raises(ValueError, match="4096x4096 pixels is outside.*Upscale Latent to a size"):
        run("BAGELEdit", model=model, instruction="make it blue", latent=big)
    assert decoded == []
    monkeypatch.undo()
    other = lib.load(lib.bundled.default_model_dir())
    foreign = lib.Context.empty(other)
    with pytest.raises(lib.ContextError, match="built by another model") as caught:
        run("BAGELEdit", model=model, instruction="make it blue", latent=latent, context=foreign)
    assert "Upscale Latent" not in str(caught.value)


def test_latent_inputs_a_model_cannot_take_are_named(model, scene):
    channels = model.model.config.latent_channels
    with pytest.raises(
        ValueError, match=f"latent has 4 channels, but this model's autoencoder has {channels}"
    ):
        run("BAGELEdit", model=model, instruction="x", latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="latent must be a ComfyUI LATENT of images"):
        run("BAGELEdit", model=model, instruction="x", latent={"samples": torch.zeros(1, channels, 2, 8, 8)})
    with pytest.raises(ValueError, match="^latent: a latent of 40x40 pixels is outside"):
        run("BAGELEdit", model=model, instruction="x", latent={"samples": torch.zeros(1, channels, 5, 5)})
    with pytest.raises(ValueError, match="image and latent are both connected"):
        run("BAGELEdit", model=model, instruction="x", image=scene[0], latent={"samples": torch.zeros(1)})
    with pytest.raises(ValueError, match="edit instruction is empty"):
        run("BAGELEdit", model=model, instruction=" ", latent={"samples": torch.zeros(1, channels, 6, 6)})


# -- composing a context by hand --------------------------------------------------------------------------


def test_context_add_images_and_text_equal_the_same_appends_in_the_library(model, two_scenes):
    bagel = model.model
    (ctx,) = run("BAGELContextAddImages", model=model, images=two_scenes, mode="vae+vit")["result"]
    (ctx,) = run(
        "BAGELContextAddText", model=model, text="put the circle into the second image", context=ctx
    )["result"]
    expected = lib.Context.empty(bagel)
    for picture in images.to_pils(two_scenes):
        expected = expected.append_image(picture)
    expected = expected.append_text("put the circle into the second image")
    assert [s.kind for s in ctx.cond.segments] == ["vae", "vit", "vae", "vit", "text"]
    assert ctx.summary() == expected.summary()

    answer, _ = run("BAGELUnderstand", model=model, question="how many shapes are there?", context=ctx)[
        "result"
    ]
    settings = lib.TextSettings(max_new_tokens=FAST["max_new_tokens"])
    assert (
        answer == lib.understand(bagel, "how many shapes are there?", context=expected, settings=settings)[0]
    )

    drawn, *_ = run("BAGELTextToImage", model=model, prompt="", context=ctx, seed=3)["result"]
    settings = sampler_settings("BAGELTextToImage")
    library = lib.generate_images(bagel, None, context=expected, settings=settings, seed=3).images[0]
    assert torch.equal(drawn, images.to_image([library]))


def test_context_add_images_vit_mode_appends_the_vision_part_only(model, two_scenes):
    (ctx,) = run("BAGELContextAddImages", model=model, images=two_scenes, mode="vit")["result"]
    assert [s.kind for s in ctx.cond.segments] == ["vit", "vit"]
    answer, _ = run("BAGELUnderstand", model=model, question="what is in the second image?", context=ctx)[
        "result"
    ]
    assert answer.strip()


def test_context_nodes_never_modify_the_context_they_are_given(model, scene):
    base = scene[1]
    before = (base.summary(), [s.kv for s in base.cond.segments])
    (once,) = run("BAGELContextAddText", model=model, text="make it bigger", context=base)["result"]
    (again,) = run("BAGELContextAddText", model=model, text="make it bigger", context=base)["result"]
    (with_image,) = run("BAGELContextAddImages", model=model, images=scene[0], mode="vae+vit", context=base)[
        "result"
    ]
    assert (base.summary(), [s.kv for s in base.cond.segments]) == before
    assert once is not again and once.summary() == again.summary()
    assert with_image.tokens > base.tokens
    first = run("BAGELEdit", model=model, instruction="", context=once, seed=2)["result"][0]
    second = run("BAGELEdit", model=model, instruction="", context=again, seed=2)["result"][0]
    assert torch.equal(first, second)


def test_context_add_text_refuses_empty_text(model):
    with pytest.raises(lib.ContextError, match="text to append is empty"):
        run("BAGELContextAddText", model=model, text="  ")


# -- Reason, and why decoding stopped -------------------------------------------------------------------


STOP = importlib.import_module(f"{PACK}.bagel_model.engine")


@pytest.fixture
def script(monkeypatch):
    """Install `segments` (text, or (text, stop)) as the reasoning loop's decoder (the bundled model writes
    no protocol text of its own); each segment reports two tokens to the callback, as decoding does."""

    def install(*segments):
        queue = [s if isinstance(s, tuple) else (s, STOP.STOP_END) for s in segments]

        def decode(model, history, settings, seed=0, callback=None):
            text, stop = queue.pop(0)
            for step in (1, 2):
                if callback is not None:
                    callback(step, 2, text)
            return STOP.Answer(text, stop)

        monkeypatch.setattr(lib.reasoning, "decode_text", decode)

    return install


def reason_node(model, **inputs) -> dict:
    cls = NODES["BAGELReason"]
    return cls().reason(**{**defaults("BAGELReason"), "model": model, "question": "where is it?", **inputs})


def test_reason_draws_what_the_model_asks_for_and_shows_the_transcript(model, scene, script):
    script("<think>move it right</think><image_start>", "<answer>at the right</answer>")
    out = reason_node(model, image=scene[0], mode="thinkmorph", seed=3)
    answer, transcript, drawn, ctx = out["result"]
    assert answer == "at the right"
    assert transcript == "<think>move it right</think><image_start>\n[image 1]\n<answer>at the right</answer>"
    assert drawn.shape == (1, *scene[0].shape[1:])
    assert out["ui"] == {"context": [ctx.summary()], "text": [transcript]}
    # the picture is the one the library's loop draws with the node's settings
    script("<think>move it right</think><image_start>", "<answer>at the right</answer>")
    expected = lib.reason(
        model.model, "where is it?", image=images.to_pil(scene[0]), seed=3,
        text_settings=lib.TextSettings(FAST["max_new_tokens"], True, 0.3),
        flow_settings=sampler_settings("BAGELReason"),
    )  # fmt: skip
    assert torch.equal(drawn, images.to_image(expected.images))
    assert ctx.summary() == expected.context.summary()


def test_reason_without_pictures_blocks_its_images_output_and_notes_a_cut(model, scene, script):
    script(("no picture needed, it is at the", STOP.STOP_BUDGET))
    modules, _ = fake_comfy()
    graph_utils = types.ModuleType("comfy_execution.graph_utils")
    graph_utils.ExecutionBlocker = type("ExecutionBlocker", (), {"__init__": lambda s, m: setattr(s, "m", m)})
    package = types.ModuleType("comfy_execution")
    package.__path__ = []
    modules.update({"comfy_execution": package, "comfy_execution.graph_utils": graph_utils})
    with mock.patch.dict(sys.modules, modules):
        out = reason_node(model, image=scene[0], mode="zebra-cot")
    answer, transcript, drawn, _ = out["result"]
    assert isinstance(drawn, graph_utils.ExecutionBlocker) and drawn.m is None  # skipped silently downstream
    assert answer == transcript == "no picture needed, it is at the"
    assert out["ui"]["text"] == [transcript + "\n[stopped: it reached max_new_tokens]"]


def test_reason_at_max_rounds_says_so(model, scene, script):
    script("draw it", "draw it again", "and again")
    out = reason_node(model, image=scene[0], mode="zebra-cot", max_rounds=2)
    assert out["result"][2].shape[0] == 2
    assert out["ui"]["text"][0].endswith(
        "[stopped: max_rounds images were drawn and the last segment asked for another]"
    )


@pytest.mark.parametrize("mode", ["thinkmorph", "zebra-cot"])
def test_reason_defaults_are_the_modes(model, scene, monkeypatch, mode):
    # a widget's default cannot follow another widget: the defaults are sentinels the node resolves per mode
    required = NODES["BAGELReason"].INPUT_TYPES()["required"]
    assert (required["max_rounds"][1]["default"], required["max_new_tokens"][1]["default"]) == (-1, 0)
    seen = {}

    def library_reason(*args, **kwargs):
        seen.update(kwargs)
        raise Interrupted

    monkeypatch.setattr(importlib.import_module(f"{PACK}.nodes.reason"), "reason", library_reason)
    with pytest.raises(Interrupted):
        reason_node(model, image=scene[0], mode=mode, max_rounds=-1, max_new_tokens=0)
    protocol = lib.PROTOCOLS[mode]  # ThinkMorph: 3 rounds of 4096 tokens; Zebra-CoT: 8 of 1000
    assert (seen["max_rounds"], seen["text_settings"]) == (protocol.max_rounds, protocol.text)
    with pytest.raises(Interrupted):
        reason_node(model, image=scene[0], mode=mode, max_rounds=0, max_new_tokens=5)
    assert (seen["max_rounds"], seen["text_settings"].max_new_tokens) == (0, 5)


def test_reason_progress_follows_each_round_and_cancel_stops_it(model, scene, script):
    script("<image_start>", "<answer>x</answer>")
    modules, bars = fake_comfy()
    with mock.patch.dict(sys.modules, modules):
        reason_node(model, image=scene[0], steps=4)
    (bar,) = bars  # one bar, restarted by each text segment and picture (at 0 of its 3 evaluated steps)
    shown = list(zip(bar.values, bar.totals, strict=True))
    assert shown == [(1, 2), (2, 2), (0, 3), (1, 3), (2, 3), (3, 3), (1, 2), (2, 2)]
    script("<image_start>", "<answer>x</answer>")
    ctx = scene[1]
    before = ctx.summary()
    modules, _ = fake_comfy(interrupt_at=4)  # in the picture's denoising
    with mock.patch.dict(sys.modules, modules), pytest.raises(Interrupted):
        reason_node(model, context=ctx)
    assert ctx.summary() == before


def test_understand_and_think_note_a_cut_answer_on_the_node_only(model, scene, monkeypatch):
    monkeypatch.setattr(lib.tasks, "decode_text", lambda *a, **k: STOP.Answer("a red", STOP.STOP_WINDOW))
    for node_id, inputs in [("BAGELUnderstand", {}), ("BAGELThink", {"instruction": "why?"})]:
        out = run(node_id, model=model, context=scene[1], **inputs)
        assert out["result"][0] == "a red"
        assert out["ui"]["text"] == ["a red\n[stopped: the model's position window is full]"]
    monkeypatch.setattr(lib.tasks, "decode_text", lambda *a, **k: STOP.Answer("a red circle", STOP.STOP_END))
    assert run("BAGELUnderstand", model=model, context=scene[1])["ui"]["text"] == ["a red circle"]


# -- loader: fine-tune folders and single files -----------------------------------------------------------


@pytest.fixture
def comfy_models(tmp_path, monkeypatch):
    """ComfyUI's models/bagel, models/diffusion_models and models/vae as this test fills them."""
    roots = {name: tmp_path / name for name in ("bagel", "diffusion_models", "vae")}
    for root in roots.values():
        root.mkdir()
    monkeypatch.setattr(bridge, "model_roots", lambda: [roots["bagel"]])

    def model_files(kind):  # ComfyUI's names: relative paths, sub-folders included
        return {str(p.relative_to(roots[kind])): p for p in sorted(roots[kind].rglob("*")) if p.is_file()}

    monkeypatch.setattr(bridge, "model_files", model_files)
    return roots


def test_loader_lists_fine_tunes_and_single_files(comfy_models):
    bundled = lib.bundled.default_model_dir()
    bagel, diffusion, vae = comfy_models["bagel"], comfy_models["diffusion_models"], comfy_models["vae"]
    (bagel / "Zebra-CoT").mkdir()
    (bagel / "Zebra-CoT" / "llm_config.json").write_text("{}")
    (bagel / "Zebra-CoT" / "model_bf16.safetensors").touch()
    (bagel / "notes").mkdir()
    shutil.copy(bundled / "ema.safetensors", bagel / "bagel-tiny.safetensors")
    shutil.copy(bundled / "ae.safetensors", bagel / "ae.safetensors")  # readable, not BAGEL: left out
    (bagel / "cut.safetensors").write_bytes(b"\x10")  # unreadable: listed, so loading it says why
    (diffusion / "bagel").mkdir()
    shutil.copy(bundled / "ema.safetensors", diffusion / "bagel" / "tiny.safetensors")
    shutil.copy(bundled / "ema.safetensors", diffusion / "bagel-tiny.safetensors")  # models/bagel's wins
    shutil.copy(bundled / "ae.safetensors", diffusion / "flux1-dev.safetensors")  # another model: left out
    (diffusion / "cut.safetensors").write_bytes(b"\x10")
    shutil.copy(bundled / "ae.safetensors", vae / "ae.safetensors")
    inputs = NODES["BAGELLoader"].INPUT_TYPES()
    names = inputs["required"]["model_name"][0]
    assert names == [lib.bundled.DEFAULT_NAME, "Zebra-CoT", "bagel-tiny.safetensors", "cut.safetensors",
                     "bagel/tiny.safetensors"]  # fmt: skip
    assert loader.find_model("bagel/tiny.safetensors") == diffusion / "bagel" / "tiny.safetensors"
    assert loader.find_model("bagel-tiny.safetensors") == bagel / "bagel-tiny.safetensors"
    assert inputs["optional"]["vae_name"][0] == ["auto", "ae.safetensors"]


def test_loader_loads_a_single_file_with_comfyuis_vae_and_tokenizer(comfy_models, model, monkeypatch):
    """A single file takes models/vae/ae.safetensors and ComfyUI's Qwen2.5 tokenizer (here the bundled
    model's parts stand in for both) and draws what the bundled folder draws."""
    bundled = lib.bundled.default_model_dir()
    path = comfy_models["diffusion_models"] / "bagel-tiny.safetensors"
    shutil.copy(bundled / "ema.safetensors", path)
    meta = {name: json.loads((bundled / name).read_text()) for name in ("llm_config.json", "vit_config.json",
            "ae_config.json", "bagel_inference.json")}  # fmt: skip
    metadata = {"format": "comfyui_bagel", "format_version": 1, "model_configs": meta}
    sidecar = {"format": "comfyui_bagel_sidecar", "format_version": 1, "checkpoint_size": path.stat().st_size,
               "metadata": metadata}  # fmt: skip
    Path(f"{path}.comfyui-bagel.json").write_text(json.dumps(sidecar))
    with pytest.raises(FileNotFoundError, match="models/vae has no ae.safetensors: put FLUX's autoencoder"):
        run("BAGELLoader", model_name="bagel-tiny.safetensors")
    shutil.copy(bundled / "ae.safetensors", comfy_models["vae"] / "ae.safetensors")
    monkeypatch.setattr(bridge, "qwen25_tokenizer", lambda: None)
    with pytest.raises(FileNotFoundError, match="this ComfyUI has no comfy/text_encoders/qwen25_tokenizer"):
        run("BAGELLoader", model_name="bagel-tiny.safetensors")
    monkeypatch.setattr(bridge, "qwen25_tokenizer", lambda: bundled)
    with pytest.raises(FileNotFoundError, match="vae_name 'sdxl.safetensors' is not in ComfyUI's models/vae"):
        run("BAGELLoader", model_name="bagel-tiny.safetensors", vae_name="sdxl.safetensors")
    (managed,) = run("BAGELLoader", model_name="bagel-tiny.safetensors")
    assert managed.model.source == path
    prompt = {"prompt": "a red circle at the center", "seed": 5}
    drawn = run("BAGELTextToImage", model=managed, **prompt)["result"][0]
    assert torch.equal(drawn, run("BAGELTextToImage", model=model, **prompt)["result"][0])


def test_comfy_bridge_finds_comfyuis_files_and_tokenizer(tmp_path):
    folder_paths = types.ModuleType("folder_paths")
    files = {"vae": {"ae.safetensors": tmp_path / "ae.safetensors", "gone.safetensors": None}}
    folder_paths.get_filename_list = lambda kind: list(files[kind])
    folder_paths.get_full_path = lambda kind, name: (
        None if files[kind][name] is None else str(files[kind][name])
    )
    comfy = types.ModuleType("comfy")
    comfy.__path__ = [str(tmp_path / "old"), str(tmp_path / "ComfyUI" / "comfy")]
    tokenizer = tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer"
    tokenizer.mkdir(parents=True)
    with mock.patch.dict(sys.modules, {"folder_paths": folder_paths, "comfy": comfy}):
        assert bridge.model_files("vae") == {"ae.safetensors": tmp_path / "ae.safetensors"}
        assert bridge.qwen25_tokenizer() == tokenizer
    assert bridge.model_files("vae") == {} and bridge.qwen25_tokenizer() is None  # outside ComfyUI


def test_download_of_a_fine_tune_without_an_autoencoder(comfy_models, monkeypatch):
    """A fine-tune repo (model_bf16.safetensors, no ae.safetensors) is complete as downloaded: loaded with
    models/vae's autoencoder, not fetched again; a truncated weights file is fetched again."""
    bundled = lib.bundled.default_model_dir()
    shutil.copy(bundled / "ae.safetensors", comfy_models["vae"] / "ae.safetensors")
    fetched = []

    def fetch(repo_id, target, timeout):
        fetched.append(sorted(p.name for p in target.iterdir()) if target.exists() else [])
        target.mkdir(exist_ok=True)
        for name in (
            "llm_config.json",
            "vit_config.json",
            "ae_config.json",
            "bagel_inference.json",
            "tokenizer.json",
        ):
            if not (target / name).exists():
                shutil.copy(bundled / name, target / name)
        if not (target / "model_bf16.safetensors").exists():
            shutil.copy(bundled / "ema.safetensors", target / "model_bf16.safetensors")

    monkeypatch.setattr(hub, "fetch", fetch)
    (managed,) = load_downloading("someone/Bagel-Zebra-CoT")
    folder = comfy_models["bagel"] / "someone--Bagel-Zebra-CoT"
    assert managed.model.source == folder and fetched == [[]]
    load_downloading("someone/Bagel-Zebra-CoT")
    assert len(fetched) == 1
    with open(folder / "model_bf16.safetensors", "r+b") as f:
        f.truncate(1000)
    load_downloading("someone/Bagel-Zebra-CoT")
    assert "model_bf16.safetensors" not in fetched[1] and len(fetched) == 2


def test_a_truncated_single_file_is_named_unreadable_before_the_autoencoder_is_looked_for(comfy_models):
    """With models/vae empty, a cut file was reported as holding no autoencoder: its header comes first."""
    (comfy_models["bagel"] / "cut.safetensors").write_bytes(b"\x10")
    with pytest.raises(lib.CheckpointError, match=r"cut.safetensors is not a readable safetensors file"):
        run("BAGELLoader", model_name="cut.safetensors")


# -- live text ------------------------------------------------------------------------------------------


def fake_server() -> tuple[dict, list]:
    """A stand-in for ComfyUI's `server` module recording what `send_progress_text` was given."""
    sent: list = []

    class PromptServer:
        client_id = "client-1"

        def send_progress_text(self, text, node_id, sid=None):
            sent.append((text, node_id, sid))

    server = types.ModuleType("server")
    server.PromptServer = PromptServer
    PromptServer.instance = PromptServer()
    return {"server": server}, sent


@pytest.mark.parametrize("node_id", ["BAGELUnderstand", "BAGELThink", "BAGELReason"])
def test_text_nodes_take_their_node_id_as_a_hidden_input(node_id):
    assert NODES[node_id].INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_live_text_sends_the_first_text_then_every_few_tokens_and_always_the_final():
    modules, sent = fake_server()
    progress = []
    with mock.patch.dict(sys.modules, modules):
        live = bridge.LiveText("7", lambda *c: progress.append(c), every=4, interval=3600)
        words = [f"w{n}" for n in range(10)]
        for n in range(1, 11):
            live(n, 10, " ".join(words[:n]))
        live.finish(" ".join(words))
    assert len(progress) == 10  # every call reaches the progress callback
    assert [text for text, _, _ in sent] == [" ".join(words[:n]) for n in (1, 5, 9, 10)]
    assert {(node, sid) for _, node, sid in sent} == {("7", "client-1")}


def test_live_text_sends_what_it_held_back_when_a_picture_starts():
    modules, sent = fake_server()
    with mock.patch.dict(sys.modules, modules):
        live = bridge.LiveText("7", lambda *c: None, every=4, interval=3600)
        for step, text in enumerate(["a", "a b", "a b\n[drawing image 1]"], start=1):
            live(step, 9, text)
        live(1, 3, torch.zeros(1))  # a denoising step: the held text goes out
        live(2, 3, torch.zeros(1))  # nothing held back: progress only
    assert [text for text, _, _ in sent] == ["a", "a b\n[drawing image 1]"]


def test_live_text_sends_when_the_interval_passed(monkeypatch):
    modules, sent = fake_server()
    clock = iter([0.0, 0.05, 0.2, 0.25])
    monkeypatch.setattr(bridge.time, "monotonic", lambda: next(clock))
    with mock.patch.dict(sys.modules, modules):
        live = bridge.LiveText("7", lambda *c: None, every=100, interval=0.1)
        for text in ["a", "a b", "a b c", "a b c d"]:
            live.update(text)
    assert [text for text, _, _ in sent] == ["a", "a b c"]


def test_understand_and_think_show_their_text_as_it_is_decoded(model, scene):
    for node_id, inputs in [
        ("BAGELUnderstand", {"image": scene[0]}),
        ("BAGELThink", {"instruction": "why?"}),
    ]:
        modules, sent = fake_server()
        with mock.patch.dict(sys.modules, modules):
            out = run(node_id, model=model, unique_id="4", max_new_tokens=24, **inputs)
        final = out["result"][0]
        texts = [text for text, node, _ in sent if node == "4"]
        assert len(texts) == len(sent) >= 2 and texts[-1] == final, node_id
        assert all(final.startswith(text) for text in texts), node_id
        assert out["ui"]["text"] == [final]  # the node's own text output is as it was
