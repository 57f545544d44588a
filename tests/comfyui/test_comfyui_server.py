"""The pack inside a real ComfyUI server: it loads, registers its nodes, runs every API-format example
workflow to the outputs it promises, stops on an interrupt within about a step, and gives the same result
when a workflow is queued again (from the cache, and recomputed after the cache and models are freed).

Needs $COMFYUI_DIR (see conftest.py); skipped otherwise, failed under CI=true (`.ci/run` provides it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import ImageChops

from bagel_model import BagelModel, bundled
from bagel_model.checkpoint import read_config

WORKFLOWS = Path(__file__).resolve().parents[2] / "example_workflows" / "api"
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
}


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


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
        if run.history["prompt"][2][node_id]["class_type"] in NODE_IDS:
            assert output["context"][0].endswith("MiB")
    print(f"{name}: {run.seconds:.1f} s")


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


def test_bundled_model_draws_the_scene_the_workflow_asks_for(server):
    from bagel_model.shapes.grading import scene_matches
    from bagel_model.shapes.language import parse_description
    from bagel_model.shapes.scorer import read_scene

    prompt = workflow("text_to_image")
    asked = parse_description(prompt["2"]["inputs"]["prompt"])
    run = server.run(prompt)
    (image,) = server.images(run, "3")
    assert scene_matches(read_scene(image), asked)
