"""Smoke test of the benchmark scripts: they run end to end on a tiny model and write what they promise.

Not a timing test: the numbers depend on the machine; only their presence and sign are checked.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny"]
    cmd += ["--size", "64", "--steps", "2", "--tokens", "4", "--only", "bf16", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["finished"] and data["preset"] == "tiny" and data["steps"] == 2
    rows = {r["task"]: r for r in data["rows"] if r["row"] == "bf16"}
    assert set(rows) == {"understand", "t2i", "t2i cfg_img 1.5", "edit"}
    for row in rows.values():
        assert "status" not in row, row
        assert row["seconds"] > 0 and row["forwards"] > 0 and row["peak MiB"] > 0, row
    assert rows["t2i"]["size"] == "64x64" and rows["t2i"]["s/step"] > 0
    assert rows["understand"]["tokens"] >= 1
    assert "bf16" in done.stdout and "edit" in done.stdout  # the table is printed too


def run_gpu_check(out: Path, *options: str, python: str = sys.executable, timeout: int = 300) -> dict:
    """gpu_check on the CPU with the tiny preset, 64 px, 2 steps, and `options`: its JSON."""
    cmd = [python, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny"]
    cmd += ["--size", "64", "--steps", "2", "--tokens", "4", "--out", str(out), *options]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["finished"], data
    return data


def check_edit_chain(records: list[dict]) -> dict[str, dict]:
    """The edit-chain row's records, checked: every prompt's four contexts kept alive, their K/V (as they
    report them to ComfyUI's cache) compact copies on the offload device; by task ("5 prompts", ...)."""
    rows = {r["task"]: r for r in records if r["row"] == "edit-chain"}
    assert set(rows) == {"5 prompts", "20 prompts"}, rows
    for n, row in ((5, rows["5 prompts"]), (20, rows["20 prompts"])):
        assert "status" not in row, row
        assert row["prompts"] == n and row["kept contexts"] == 4 * n, row  # Text to Image + 3 Edits each
        assert row["K/V on the offload device"] and row["K/V compact"], row
        assert row["K/V devices"] == ["cpu"] and row["offload device"] == "cpu" and row["steps"] == 2, row
        assert row["s/prompt"] > 0, row
    # each prompt holds as much as the others: 20 prompts keep 4 times what 5 keep (MiB rounded to 0.1)
    assert rows["5 prompts"]["kept K/V MiB"] > 0
    assert abs(rows["20 prompts"]["kept K/V MiB"] - 4 * rows["5 prompts"]["kept K/V MiB"]) <= 0.3, rows
    return rows


def test_gpu_check_comfyui_rows_on_the_cpu_without_comfyui(tmp_path):
    """Without ComfyUI (--comfyui empty) the budget rows say why they cannot run and the edit chain runs on
    the library with the K/V storage the bridge sets."""
    data = run_gpu_check(
        tmp_path / "gpu_check.json", "--only", "comfyui-20gb,comfyui-12gb,edit-chain", "--comfyui", ""
    )
    budgets = {r["row"]: r["status"] for r in data["rows"] if r["row"].startswith("comfyui-")}
    assert budgets == dict.fromkeys(
        ("comfyui-20gb", "comfyui-12gb"), "not available: a GPU memory budget needs --device cuda"
    )
    rows = check_edit_chain(data["rows"])
    assert rows["5 prompts"]["managed by"].startswith("library: Bagel.place(kv_storage=cpu)"), rows
    assert "give --comfyui DIR" in rows["5 prompts"]["managed by"]


def test_random_model_fills_every_tensor_and_repeats_with_its_seed(tmp_path):
    from bagel_model.config import TINY_CONFIG
    from bagel_model.quant import Fp8Linear
    from bagel_model.tiny import random_model, write_tokenizer

    write_tokenizer(tmp_path, TINY_CONFIG.llm.vocab_size)
    a = random_model(TINY_CONFIG, tmp_path, seed=3)
    b = random_model(TINY_CONFIG, tmp_path, seed=3)
    fp8 = random_model(TINY_CONFIG, tmp_path, weights="fp8", seed=3)
    tensors = dict(a.state_dict())
    assert not any(t.is_meta for t in tensors.values())
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in tensors.items())
    # the quantized mode draws the same weights: what it keeps unquantized is equal
    kept = fp8.state_dict()
    assert all(torch.equal(t, kept[k]) for k, t in tensors.items() if k in kept)
    layer = fp8.net.language_model.model.layers[0].mlp_moe_gen.up_proj
    assert isinstance(layer, Fp8Linear)
    assert a.net.vit_pos_embed.pos_embed.abs().max() <= 1  # the sin-cos table, not noise


def test_bench_stream_reports_both_modes_on_the_bundled_model(tmp_path):
    out = tmp_path / "bench_stream.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_stream.py"), "--repeats", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["task"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"understand", "think"}
    for row in rows.values():
        assert row["tokens"] > 1 and row["plain tok/s"] > 0 and row["stream tok/s"] > 0, row
    assert "stream tok/s" in done.stdout  # the table is printed too


def test_gpu_check_lora_training_row_on_the_cpu(tmp_path):
    data = run_gpu_check(tmp_path / "gpu_check.json", "--only", "lora-train")
    rows = {r["task"]: r for r in data["rows"] if r["row"] == "lora-train"}
    assert set(rows) == {"t2i", "edit"}
    for row in rows.values():
        assert "status" not in row, row
        assert row["steps"] == 5 and row["steps/s"] > 0 and row["peak MiB"] > 0 and row["size"] == "64x64"
