"""The pack inside a real ComfyUI server: it loads, registers its nodes, runs every API-format example
workflow to the outputs it promises and grades them with the shapes scorer (the bundled model must draw,
answer, edit, move and navigate right, as a newcomer sees it), stops on an interrupt within about a step,
and gives the same result when a workflow is queued again (from the cache, and recomputed after the cache
and models are freed).

Needs $COMFYUI_DIR (see conftest.py); skipped otherwise, failed under CI=true (`.ci/run` provides it).
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import WORKFLOWS, workflow
from PIL import ImageChops

from bagel_model import BagelModel, bundled
from bagel_model.layout import read_config
from bagel_model.shapes import (
    CELLS,
    COLORS,
    SHAPES,
    Obj,
    describe,
    indirect_prompt,
    navigation_consistent,
    parse_description,
    read_scene,
)

NODE_IDS = {
    "BAGELLoader",
    "BAGELUnderstand",
    "BAGELThink",
    "BAGELTextToImage",
    "BAGELEdit",
    "BAGELMultiFrame",
    "BAGELNavigate",
    "BAGELContextAddText",
    "BAGELContextAddImages",
    "BAGELReason",
    "BAGELTrainLora",
}
# What each example promises: images per output node (all at the model's default size), and the nodes
# that show a non-empty text.
PROMISES = {
    "text_to_image": ({"3": 1}, []),
    "understand": ({"3": 1}, ["4"]),
    "think_then_generate": ({"4": 1}, ["2"]),
    "edit_chain": ({"6": 1, "7": 1, "8": 1, "9": 1}, []),
    "multi_frame": ({"4": 2}, []),
    "navigation": ({"4": 2}, []),
    "multi_reference": ({"8": 2, "9": 1}, []),
    "visual_reasoning": ({"4": 2}, ["3"]),
    "batch": ({"3": 4}, []),
    "latent_flip_edit": ({"3": 1, "6": 1}, []),
    "train_lora": ({"11": 1, "14": 1}, ["9"]),
}


# What each example must show, by output node: the scenes its images must read as, in order. Read off the
# workflow's own words (edit_chain: a red circle, made green, moved to the top left, a blue square added).
SCENES = {
    "text_to_image": {"3": ["a red circle at the top left, a blue square at the center"]},
    "understand": {"3": ["a green triangle at the center, a yellow circle at the bottom right"]},
    "think_then_generate": {"4": ["a blue triangle at the center"]},
    "edit_chain": {
        "6": ["a red circle at the center"],
        "7": ["a green circle at the center"],
        "8": ["a green circle at the top left"],
        "9": ["a green circle at the top left, a blue square at the bottom right"],
    },
    "multi_frame": {"4": ["a red circle at the center", "a red circle at the right"]},
    "batch": {"3": ["a green triangle at the center, a yellow circle at the bottom right"] * 4},
    # "6" (Edit of the mirrored latent) is not graded: a latent mirrored cell by cell is no latent the
    # bundled model's autoencoder ever made, and the edit comes out as other shapes (the 48 px model of
    # 2026-11-30: a yellow triangle at the top right, where the mirrored square should turn green).
    "latent_flip_edit": {"3": ["a blue square at the top left"]},
    # Trained in the graph on four of the model's own blue pictures captioned "azure": the new adapter draws
    # azure as blue in a place and shape combination it never saw; the base model does not know the word.
    "train_lora": {"11": ["a blue circle at the center"], "14": ["a green circle at the center"]},
}
# Not graded: multi_reference ("put the red circle from the first image into the second") and
# visual_reasoning (pictures inside a zebra-cot transcript) ask for what the shapes world never trains;
# they show the wiring. navigation is graded below by the world's rule for views.


def default_size() -> tuple[int, int]:
    """(width, height) the bundled model draws at when a workflow leaves the size at 0."""
    inference = read_config(bundled.default_model_dir()).inference
    return inference.default_width, inference.default_height


def test_every_api_workflow_has_a_promise():
    assert {p.stem for p in WORKFLOWS.glob("*.json")} == set(PROMISES)


def test_pack_imports_and_registers_every_node(server):
    log = server.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and server.pack in line]
    assert not failed, log[-3000:]
    info = server.get_json("/object_info")
    assert NODE_IDS <= set(info)
    for node_id in NODE_IDS:
        assert info[node_id]["category"].startswith("BAGEL")
        assert info[node_id]["display_name"].startswith("BAGEL ")
    assert f"/extensions/{server.pack}/bagel.js" in server.get_json("/extensions")
    assert set(server.get_json("/api/workflow_templates")[server.pack]) == set(PROMISES)


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_example_workflow_runs_to_its_promised_outputs(server, name):
    server.free()  # timed from scratch: model load included, nothing cached from other tests
    run = server.run(workflow(name))
    assert run.status == "execution_success", json.dumps(run.events[-1], indent=1)[:3000]
    images, texts = PROMISES[name]
    for node_id, count in images.items():
        found = server.images(run, node_id)
        assert len(found) == count and all(image.size == default_size() for image in found), node_id
    for node_id in texts:
        (text,) = run.history["outputs"][node_id]["text"]
        assert text.strip(), f"node {node_id} wrote nothing"
    for node_id, output in run.history["outputs"].items():
        if run.history["prompt"][2][node_id]["class_type"] in NODE_IDS - {"BAGELTrainLora"}:  # no context
            assert output["context"][0].endswith("MiB")
    for node_id, scenes in SCENES.get(name, {}).items():
        read = [describe(read_scene(image)) for image in server.images(run, node_id)]
        assert read == scenes, f"{name}, node {node_id}"
    print(f"{name}: {run.seconds:.1f} s")


def answer(run, node_id: str) -> str:
    (text,) = run.history["outputs"][node_id]["text"]
    return text.strip()


def test_understand_example_answers_with_the_scene_it_drew(server):
    run = server.run(workflow("understand"))
    assert answer(run, "4") == SCENES["understand"]["3"][0]


def test_think_example_plans_the_scene_its_indirect_prompt_means(server):
    prompt = workflow("think_then_generate")
    instruction = prompt["2"]["inputs"]["instruction"]
    (meant,) = [
        ind.scene
        for color in COLORS
        for shape in SHAPES
        for cell in CELLS
        if (ind := indirect_prompt(Obj(color, shape, cell))).prompt == instruction
    ]
    assert describe(meant) == SCENES["think_then_generate"]["4"][0]
    assert answer(server.run(prompt), "2").endswith(f"</think> {describe(meant)}")


@pytest.mark.parametrize(("name", "node_id"), [("understand", "4"), ("think_then_generate", "2")])
def test_text_shows_on_the_node_as_it_is_decoded(server, name, node_id):
    """Understand and Think send the text so far as ComfyUI's progress text while they decode: several
    messages before the node finishes, each a prefix of the final text, the last equal to it."""
    server.free()  # run, not taken from the cache
    run = server.run(workflow(name))
    assert run.status == "execution_success", json.dumps(run.events[-1], indent=1)[:3000]
    (final,) = run.history["outputs"][node_id]["text"]
    done = next(
        k for k, e in enumerate(run.events) if e["type"] == "executed" and e["data"]["node"] == node_id
    )
    shown = [
        (k, e["data"]["text"])
        for k, e in enumerate(run.events)
        if e["type"] == "progress_text" and e["data"]["node"] == node_id
    ]
    assert len(shown) >= 3, shown
    assert all(k < done for k, _ in shown)
    assert all(final.startswith(text) for _, text in shown), (final, shown)
    assert shown[-1][1] == final


def test_reason_shows_its_transcript_as_it_grows_with_a_marker_while_drawing(server):
    """The visual-reasoning example draws 2 pictures (zebra-cot: every segment without a final answer asks
    for one): the live transcript says which picture is being drawn, and ends as the node's transcript."""
    server.free()
    run = server.run(workflow("visual_reasoning"))
    assert run.status == "execution_success", json.dumps(run.events[-1], indent=1)[:3000]
    shown = [e["data"]["text"] for e in run.events if e["type"] == "progress_text"]
    last_lines = [text.rsplit("\n", 1)[-1] for text in shown]
    assert [line for line in last_lines if line.startswith("[drawing")] == [
        "[drawing image 1]",
        "[drawing image 2]",
    ]
    (final,) = run.history["outputs"]["3"]["text"]  # the transcript, then a note on why it stopped
    assert "[image 1]" in shown[-1] and "[image 2]" in shown[-1] and final.startswith(shown[-1])


def test_navigation_example_keeps_the_cells_that_stay_in_view(server):
    prompt = workflow("navigation")
    moves = prompt["3"]["inputs"]["actions"].split("\n")
    before = parse_description(prompt["2"]["inputs"]["prompt"])
    frames = server.images(server.run(prompt), "4")
    assert len(frames) == len(moves)
    for frame, move in zip(frames, moves, strict=True):
        after = read_scene(frame)
        assert navigation_consistent(before, after, move), f"{move}: {describe(before)} -> {describe(after)}"
        before = after


def test_reason_that_draws_nothing_skips_the_nodes_its_images_feed(server):
    """Its images output is ComfyUI's silent ExecutionBlocker then: Save Image is skipped, no error."""
    prompt = workflow("visual_reasoning")
    prompt["3"]["inputs"]["mode"] = "thinkmorph"  # the bundled model never writes <image_start>
    run = server.run(prompt)
    assert run.status == "execution_success", json.dumps(run.events[-1], indent=1)[:3000]
    assert not run.history["outputs"].get("4", {}).get("images")
    (text,) = run.history["outputs"]["3"]["text"]
    assert text.strip()


def test_requeued_workflow_gives_the_same_images_cached_and_recomputed(server):
    prompt = workflow("text_to_image")
    first = server.run(prompt)
    again = server.run(prompt)
    assert again.cached == set(prompt)
    server.free()
    recomputed = server.run(prompt)
    assert recomputed.status == "execution_success" and not recomputed.cached
    for run in (again, recomputed):
        (a,), (b,) = server.images(first, "3"), server.images(run, "3")
        assert ImageChops.difference(a, b).getbbox() is None
    # Went through ComfyUI's memory manager, which logs the class its ModelPatcher holds.
    assert f"Requested to load {BagelModel.__name__}" in server.log_text()


def test_interrupt_stops_within_about_one_step(server):
    prompt = workflow("text_to_image")
    prompt["2"]["inputs"].update(steps=400, seed=12345)
    seen: dict = {"interrupted_at": None, "after": []}

    def on_event(event):
        if event["type"] != "progress":
            return
        if seen["interrupted_at"] is not None:
            seen["after"].append(event["data"]["value"])
        elif event["data"]["value"] >= 3:
            seen["interrupted_at"] = (event["data"]["value"], time.monotonic())
            server.post("/interrupt", {})

    run = server.run(prompt, on_event=on_event)
    assert run.status == "execution_interrupted"
    step, when = seen["interrupted_at"]
    assert len(seen["after"]) <= 2, seen["after"]
    latency = time.monotonic() - when
    print(f"interrupt at step {step}/399: stopped after {len(seen['after'])} more steps, {latency:.2f} s")
