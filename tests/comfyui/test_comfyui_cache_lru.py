"""Contexts kept by ComfyUI's output cache between prompts are host-RAM tensors ComfyUI can size (issue #19).

A server runs with `--cache-lru 100` (v0.3.64's output cache that keeps results of earlier prompts) and
one more custom node, a test-only probe loaded from a temporary folder (`--extra-model-paths-config` adds
it to ComfyUI's custom_nodes paths). The probe runs inside the server process and reads what ComfyUI's
LRU caches hold: the pack's contexts, the K/V they report to ComfyUI (`_comfy_cache_tensors`, what the
newest RAM-pressure cache sizes an output by) and the Loader's patcher. On a CPU the compute and offload
devices are both the CPU, so "on the offload device" cannot tell the two apart here; what the test can
tell is that the contexts of every earlier prompt live in ComfyUI's own cache (and only there: /free drops
them), that their K/V are plain CPU tensors, each a compact copy (no view keeping a task's larger buffer
alive unseen by the cache), stored where the bridge told the model (`Bagel.kv_storage` is the patcher's
`offload_device`). On a GPU, `benchmarks/gpu_check.py`'s edit-chain row measures the device memory.

Needs $COMFYUI_DIR (see conftest.py); skipped otherwise, failed under CI=true.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, ComfyServer, _start, _stop

WORKFLOW = ROOT / "example_workflows" / "api" / "edit_chain.json"
BAGEL_NODES = ("2", "3", "4", "5")  # Text to Image, then three Edits
STEPS = 3

PROBE = r'''
"""Test-only: what ComfyUI's LRU output caches hold of the BAGEL pack, as JSON on the node's ui."""
import gc
import json


def _walk(value, found, depth=0):
    if depth > 6:
        return
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, found, depth + 1)
    else:
        found.append(value)


class BAGELTestCacheProbe:
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def probe(self, nonce):
        gc.collect()
        caches = [
            o for o in gc.get_objects()
            if type(o).__name__ == "LRUCache" and type(o).__module__ == "comfy_execution.caching"
        ]
        found = []
        for cache in caches:
            _walk(list(cache.cache.values()), found)
        contexts = list({id(o): o for o in found if hasattr(o, "_comfy_cache_tensors")}.values())
        managed = list({id(o): o for o in found if hasattr(o, "patcher") and hasattr(o, "ready")}.values())
        reported = {id(t): t for c in contexts for t in c._comfy_cache_tensors()}
        own = {id(t) for c in contexts for t in c.tensors()}
        report = {
            "caches": len(caches),
            "contexts": len(contexts),
            "tensors": len(reported),
            "bytes": sum(t.nbytes for t in reported.values()),
            "reported_is_all": set(reported) == own,
            "devices": sorted({str(t.device) for t in reported.values()}),
            "compact": all(t.untyped_storage().nbytes() == t.nbytes for t in reported.values()),
            "models": len(managed),
        }
        if managed:
            patcher, net = managed[0].patcher, managed[0].model.net
            report |= {
                "offload_device": str(patcher.offload_device),
                "load_device": str(patcher.load_device),
                "kv_storage": str(net.kv_storage),
                "on_offload": all(t.device == patcher.offload_device for t in reported.values()),
            }
        return {"ui": {"probe": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"BAGELTestCacheProbe": BAGELTestCacheProbe}
'''


@pytest.fixture(scope="module")
def lru_server(comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    probe = tmp_path_factory.mktemp("cache_probe")
    (probe / "nodes").mkdir()
    (probe / "nodes" / "bagel_cache_probe.py").write_text(PROBE)
    paths = probe / "extra_model_paths.yaml"
    paths.write_text(f"cache_probe:\n  custom_nodes: {probe / 'nodes'}\n")
    base = tmp_path_factory.mktemp("comfyui_cache_lru")
    extra = ("--cache-lru", "100", "--extra-model-paths-config", str(paths))
    started = _start(comfy_dir, base, base / "comfyui.log", extra)
    yield started
    _stop(started)


def chain(seed: int) -> dict:
    """The edit-chain example with `seed` on every BAGEL node (another seed: another prompt to cache)."""
    prompt = copy.deepcopy(json.loads(WORKFLOW.read_text()))
    for node_id in BAGEL_NODES:
        prompt[node_id]["inputs"] |= {"seed": seed, "steps": STEPS}
    return prompt


def probe(server: ComfyServer, nonce: int) -> dict:
    done = server.run({"1": {"class_type": "BAGELTestCacheProbe", "inputs": {"nonce": nonce}}})
    assert done.status == "execution_success", server.log_text()[-3000:]
    return json.loads(done.history["outputs"]["1"]["probe"][0])


def run_chain(server: ComfyServer, seed: int):
    done = server.run(chain(seed))
    assert done.status == "execution_success", server.log_text()[-3000:]
    return done


def test_the_lru_cache_keeps_each_prompts_contexts_as_compact_host_tensors(lru_server: ComfyServer):
    assert "Using LRU cache" in lru_server.log_text()
    run_chain(lru_server, 1)
    first = probe(lru_server, 1)
    assert first["caches"] >= 1 and first["models"] == 1, first
    assert first["contexts"] == 4 and first["bytes"] > 0, first  # Text to Image + 3 Edits
    for seed in (2, 3):
        run_chain(lru_server, seed)
    kept = probe(lru_server, 2)
    print(kept)
    # every earlier prompt's contexts are still held, by ComfyUI's cache, each prompt as much as the first
    assert kept["contexts"] == 12 and kept["bytes"] == 3 * first["bytes"], (first, kept)
    # what they report to ComfyUI is all they hold: plain CPU tensors, each a compact copy of its own
    assert kept["reported_is_all"] and kept["compact"] and kept["devices"] == ["cpu"], kept
    # stored where the bridge told the model: the patcher's offload device
    assert kept["kv_storage"] == kept["offload_device"] == "cpu" and kept["on_offload"], kept

    again = run_chain(lru_server, 1)  # the first prompt again: answered from the kept outputs
    assert set(BAGEL_NODES) <= again.cached, again.cached

    lru_server.free()  # "Unload models" / POST /free: ComfyUI drops its caches, and the contexts with them
    after = probe(lru_server, 3)
    assert after["contexts"] == 0 and after["models"] == 0, after


def test_gpu_check_edit_chain_runs_under_comfyui(comfy_dir: Path, tmp_path: Path):
    """gpu_check's edit-chain row on the CPU under the pinned ComfyUI: the model is the Loader's (ComfyUI's
    ModelPatcher via comfy_bridge.manage), and the bridge points the contexts' K/V at its offload device."""
    out = tmp_path / "gpu_check.json"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    cmd = [python, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny"]
    cmd += ["--size", "64", "--steps", "2", "--only", "edit-chain", "--comfyui", str(comfy_dir)]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["task"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"5 prompts", "20 prompts"}, rows
    for n, row in ((5, rows["5 prompts"]), (20, rows["20 prompts"])):
        assert row["managed by"].startswith("ComfyUI ") and "ModelPatcher" in row["managed by"], row
        assert row["kept contexts"] == 4 * n and row["K/V on the offload device"] and row["K/V compact"], row
        assert row["offload device"] == "cpu", row
