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
