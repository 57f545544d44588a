"""Text-to-image and edit timings: our engine in-process, and ours vs. the official code as whole processes.

    python benchmarks/bench_generate.py --model DIR [--size 256] [--steps 20] [--device cuda] [--compile]
        [--official-python PY --official-dir DIR]     # add the official side-by-side rows

In-process rows give seconds per image and per step, decoder forwards and peak memory (device memory on
CUDA, resident set on CPU) for text-to-image and editing, on the plain path (each CFG branch its own
forward), with a step's CFG branches batched into one forward, with the step cache too, and (--compile)
with torch.compile'd decoder layers. The side-by-side rows run `python -m bagel_model generate` and
`benchmarks/official_runner.py infer --task t2i` on the same folder, prompt and initial noise (notebook
defaults: cfg_text 4, cfg_img 1, interval [0.4, 1], shift 3, global renorm) and report each process's
wall time, peak RSS and the pixel difference between the two images. Timings are measurements, not tests:
report ratios from one run, absolute numbers only with the device.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bagel_model import load, tasks  # noqa: E402
from bagel_model.sampling import EDIT_SETTINGS, FlowSettings  # noqa: E402

PROMPT = "a red circle at the top left, a blue square at the center"
NOTEBOOK_T2I = FlowSettings(cfg_img_scale=1.0)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _count_passes(model) -> list[int]:
    """Wrap the decoder so every pass is counted; returns the mutable counter."""
    counter = [0]
    forward = model.net.forward

    def counted(*args, **kwargs):
        counter[0] += 1
        return forward(*args, **kwargs)

    model.net.forward = counted
    return counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Engine paths compared in-process: the plain one runs each CFG branch as its own forward; the batched one
# runs a step's branches as one; the step cache (an approximation) also skips steps. (The library's default
# batches on CUDA and for small CPU images: `sampling.batch_cfg`.)
PATHS = {
    "plain": {"batch_cfg": False},
    "batched CFG": {"batch_cfg": True},
    "batched CFG + step cache 2": {"batch_cfg": True, "step_cache": 2},
}
COMPILED = "plain + torch.compile"  # --compile: every decoder layer through torch.compile (measured last)


def _compile_layers(model) -> None:
    layers = model.net.language_model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer, dynamic=False)


def in_process(model_dir: str, size: int, steps: int, device: str, compile_layers: bool) -> list[dict]:
    model = load(model_dir, device=device)
    dev = model.device
    counter = _count_passes(model)
    rows = []
    source = tasks.generate_images(
        model, PROMPT, height=size, width=size, settings=FlowSettings(num_steps=2)
    ).images[0]
    jobs = {
        "t2i": lambda s: tasks.generate_images(model, PROMPT, height=size, width=size, settings=s, seed=1),
        "edit": lambda s: tasks.edit_images(model, [source], "make the circle green", settings=s, seed=1),
    }
    paths = {**PATHS, COMPILED: PATHS["plain"]} if compile_layers else PATHS
    for name, base in (("t2i", NOTEBOOK_T2I), ("edit", EDIT_SETTINGS)):
        jobs[name](replace(base, num_steps=2))  # warm-up
        plain = plain_seconds = None
        for path, options in paths.items():
            settings = replace(base, num_steps=steps, **options)
            warm_up = None
            if path == COMPILED:
                if name == "t2i":  # once; edit then recompiles for its own shapes in its warm-up
                    _compile_layers(model)
                start = time.perf_counter()
                jobs[name](replace(settings, num_steps=3))  # compiles for this task's shapes
                warm_up = time.perf_counter() - start
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            counter[0] = 0
            _sync(dev)
            start = time.perf_counter()
            image = jobs[name](settings).images[0]
            _sync(dev)
            seconds = time.perf_counter() - start
            pixels = np.asarray(image, dtype=np.int16)
            if plain is None:
                plain, plain_seconds = pixels, seconds
            row = {
                "engine": f"ours in-process, {path}",
                "task": f"{name} {image.height}x{image.width}",
                "seconds": round(seconds, 3),
                "s/step": round(seconds / (steps - 1), 4),
                "forwards": counter[0],
                "peak MiB": round(_peak_memory_mb(dev)),
                "max |Δ| vs plain": int(np.abs(pixels - plain).max()),
            }
            if path != "plain":
                row["speed-up vs plain"] = round(plain_seconds / seconds, 2)
            if warm_up is not None:
                row["compile warm-up s"] = round(warm_up, 1)
            rows.append(row)
    return rows


def _run_process(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process, its output kept in `log`."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def side_by_side(
    model_dir: str, size: int, steps: int, official_python: str, official_dir: str
) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bagel_bench_"))
    latents = work / "latents.safetensors"
    noise = torch.randn(16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    save_file({"latents": noise}, latents)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ours_png = work / "ours.png"
    ours_cmd = [sys.executable, "-m", "bagel_model", "generate", "--model", model_dir, "--prompt", PROMPT]
    ours_cmd += ["--width", str(size), "--height", str(size), "--steps", str(steps), "--cfg-img", "1.0"]
    ours_cmd += ["--latents", str(latents), "--out", str(ours_png), "--device", "cpu", "--json"]
    official_out = work / "official"
    official_cmd = [
        official_python,
        str(REPO / "benchmarks" / "official_runner.py"),
        "infer",
        "--task",
        "t2i",
    ]
    official_cmd += ["--official-dir", official_dir, "--model", model_dir, "--prompt", PROMPT]
    official_cmd += ["--height", str(size), "--width", str(size), "--steps", str(steps), "--cfg-img", "1.0"]
    official_cmd += ["--latents", str(latents), "--out", str(official_out)]
    rows = []
    for name, cmd in (("ours (process)", ours_cmd), ("official (process)", official_cmd)):
        seconds, peak = _run_process(cmd, env, work / f"{name.split()[0]}.log")
        rows.append(
            {
                "engine": name,
                "task": f"t2i {size}x{size} whole process",
                "seconds": round(seconds, 3),
                "peak MiB": round(peak),
            }
        )
    ours = np.asarray(Image.open(ours_png).convert("RGB")).astype(int)
    theirs = np.asarray(Image.open(official_out / "image.png").convert("RGB")).astype(int)
    delta = int(np.abs(ours - theirs).max())
    rows[0]["speed-up vs official"] = round(rows[1]["seconds"] / rows[0]["seconds"], 2)
    rows[0]["max |Δ| vs official"] = delta
    return rows


def print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    widths = {k: max(len(k), *(len(str(row.get(k, ""))) for row in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-|-".join("-" * widths[k] for k in keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")).ljust(widths[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder, e.g. from `make-tiny DIR --preset mid`")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--official-python", help="python of an environment that runs the official code")
    parser.add_argument("--official-dir", default=os.environ.get("BAGEL_OFFICIAL_DIR"))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--compile", action="store_true", help="add a row with torch.compile'd layers")
    args = parser.parse_args()
    rows = []
    if args.official_python:
        rows += side_by_side(args.model, args.size, args.steps, args.official_python, args.official_dir)
    rows += in_process(args.model, args.size, args.steps, args.device, args.compile)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    )
    print(f"device: {device}; torch {torch.__version__}; {args.steps} steps; model {args.model}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
