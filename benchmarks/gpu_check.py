"""One command for a lent GPU: every task on 7B-shaped random weights, in each weight mode and engine path.

    python benchmarks/gpu_check.py [--device cuda] [--preset bagel-7b-mot] [--size 1024] [--steps 50]
        [--tokens 64] [--dtype auto] [--only ROWS] [--out FILE.json] [--time-limit 420] [--official-dir DIR]
        [--comfyui DIR]

The model is built from the preset's config on meta and its random weights are drawn on the device
(`bagel_model.tiny.random_model`), in seconds where writing and reading a 29 GB file would take minutes; a
tokenizer with the BAGEL markers is written to a temporary folder. Only the rows that read a checkpoint
(offload, official) write one there, once, from the same weights.

Rows (`--only` takes a comma list of these names), each run on every task:
- bf16: the library defaults (auto attention, CFG batching as `sampling.batch_cfg` decides) in bf16 (the
  device's default dtype: float32 on a CPU unless --dtype says otherwise);
- fp8, nf4: the decoder's linears quantized as `load(weights=...)` stores them (nf4 needs bitsandbytes);
- cfg-batched, cfg-unbatched: each step's CFG branches in one forward, or one forward each;
- sdpa, flash: the attention backend forced (flash needs flash-attn on CUDA);
- offload-20gb, offload-12gb: bf16 loaded by `load(max_memory={0: "20GiB", "cpu": ...})`, the rest of
  the decoder offloaded to the CPU (issue #11 items 1-2; "not available" with a `load` that has no budget);
- official: the official `InterleaveInferencer` text-to-image on the same weights and noise (--official-dir).
A variant that is what the bf16 row already ran here says so instead of running again.

Rows under ComfyUI's memory manager (issue #19), last, since importing ComfyUI changes global torch settings;
they import the ComfyUI tree of --comfyui (default $COMFYUI_DIR, else the .comfyui-ci/ComfyUI that .ci/run
unpacks) and this repository as ComfyUI imports a pack, and build the model as the Loader does (ComfyUI's
casting layers, loaded on the offload device, `comfy_bridge.manage`):
- comfyui-20gb, comfyui-12gb: text-to-image only, with ComfyUI's ModelPatcher loading the model into a
  budget of that size (its reserved memory set, as --reserve-vram sets it, to what the device has free
  beyond the budget), the rest cast in per forward from host RAM: load seconds, what ComfyUI loaded,
  seconds per image and per step, peak memory;
- edit-chain: example_workflows/api/edit_chain.json (Text to Image -> Edit -> Edit -> Edit) run 5 and then
  20 times through the pack's nodes as separate prompts, every prompt's outputs kept as ComfyUI's output
  cache keeps them (at most 4 steps: device memory does not depend on the step count): device memory
  after each batch next to the K/V the kept contexts hold and where. Without ComfyUI it runs on the
  library alone, with the K/V storage the bridge would set (`place(kv_storage=cpu)`), and says so.
- lora-train: LoRA training of the bf16 model as `train-lora` trains by default (rank 16 on the
  generation expert, gradient checkpointing, one example per step), text-to-image and edit at --size:
  seconds per step, steps per second and peak memory over 5 steps after a warm-up step.

Tasks: understand (an image and a question, --tokens greedy), t2i at the notebook defaults (cfg_text 4,
cfg_img 1, interval [0.4, 1], shift 3, global renorm), t2i at vLLM-Omni's cfg_img 1.5, and edit at the edit
defaults, at --size and --steps. Each record has seconds (per image, per step or per token), decoder
forwards and peak memory (torch.cuda.max_memory_allocated, reset before each record; the process's peak
RSS on a CPU). A row that fails or is unavailable is recorded with its reason and the run goes on; the JSON
is rewritten after every record, and --time-limit stops starting new work (and interrupts a task that runs
past it), so a run killed early still leaves its data.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from unittest import mock

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generate import PROMPT, _count_passes, _peak_memory_mb, _sync, print_table  # noqa: E402

import bagel_model  # noqa: E402
from bagel_model import tasks  # noqa: E402
from bagel_model.checkpoint import DTYPE_CHOICES, resolve_dtype, save  # noqa: E402
from bagel_model.config import PRESETS, BagelConfig  # noqa: E402
from bagel_model.engine import TextSettings  # noqa: E402
from bagel_model.layers.attention import flash_available  # noqa: E402
from bagel_model.sampling import EDIT_SETTINGS, T2I_SETTINGS, batch_cfg  # noqa: E402
from bagel_model.tiny import random_model, write_tokenizer  # noqa: E402
from bagel_model.training.finetune import LoraSettings, train_lora  # noqa: E402
from bagel_model.training.folder import read_folder  # noqa: E402

QUESTION = "describe the image in detail."
EDIT = "make the circle green"
VLLM_OMNI_CFG_IMG = 1.5

TASKS = ("understand", "t2i", "t2i cfg_img 1.5", "edit")
ROWS = (
    "bf16",
    "cfg-batched",
    "cfg-unbatched",
    "sdpa",
    "flash",
    "fp8",
    "nf4",
    "offload-20gb",
    "offload-12gb",
    "official",
    "comfyui-20gb",
    "comfyui-12gb",
    "edit-chain",
    "lora-train",
)
LORA_STEPS = 5  # measured training steps per task, after one warm-up step
OFFLOAD_BUDGETS = {"offload-20gb": 20, "offload-12gb": 12}
COMFYUI_BUDGETS = {"comfyui-20gb": 20, "comfyui-12gb": 12}  # GiB that ComfyUI may load weights into
CHAIN = REPO / "example_workflows" / "api" / "edit_chain.json"
CHAIN_PROMPTS = (5, 20)  # prompts after which the edit-chain row records device memory
CHAIN_STEPS = 4  # at most, per image of the chain: the memory it measures does not depend on steps
PACK = "comfyui_bagel_mot"  # the package name this repository is imported under, as ComfyUI imports it
# What the pack's bridge uses of ComfyUI for a Loader and the drawing nodes: all must import.
COMFY_MODULES = ("comfy.model_management", "comfy.model_patcher", "comfy.ops", "comfy.utils", "comfy.lora")
# Checkpoint throughput assumed before writing (and reading back) one, in GiB/s, so that a row reading a
# checkpoint starts only when it can end in time: a conservative disk and a first read from it.
CHECKPOINT_GIB_PER_S = 0.3


class TimeLimit(Exception):
    """Raised from a task's step callback once the run's time limit has passed; says how far it got."""

    def __init__(self, done: int = 0, total: int = 0, seconds: float = 0.0):
        super().__init__(f"time limit after {done} of {total} steps")
        self.done, self.total, self.seconds = done, total, seconds


@dataclass
class Run:
    """What every row shares: the options, the clock, the records written so far, the bf16 images."""

    args: argparse.Namespace
    config: BagelConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer_dir: Path
    start: float = field(default_factory=time.perf_counter)
    records: list[dict] = field(default_factory=list)
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # task -> bf16 row's pixels
    task_seconds: dict[str, float] = field(default_factory=dict)  # task -> longest time so far
    build_seconds: float = 0.0
    source: Image.Image | None = None  # the picture understood and edited
    folder: Path | None = None  # the random model as a checkpoint folder, once a row needs one
    warm: bool = False  # whether a row has warmed up
    weights_gib: float = 0.0  # the bf16 model's size, once the bf16 row has measured it
    pack: Pack | None = None  # this repository imported as a ComfyUI pack, once a ComfyUI row needs it
    managed: object | None = None  # the pack's ManagedModel those rows share, once built

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, seconds: float) -> bool:
        """Whether work expected to take `seconds` still ends within the time limit."""
        return self.elapsed + seconds <= self.args.time_limit

    def clock(self, start: float):
        """A step callback for a task started at `start`: stops it once the time limit has passed, saying
        how many steps (or tokens) it finished and in how long (slow rows still give a per-step time)."""

        def check(step: int, total: int, _: object) -> None:
            if self.elapsed > self.args.time_limit:
                raise TimeLimit(step, total, time.perf_counter() - start)

        return check

    def record(self, row: str, task: str, **values: object) -> dict:
        entry = {"row": row, "task": task, **values}
        self.records.append(entry)
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        print(f"[{self.elapsed:6.1f} s] {row} | {task} | {shown}", flush=True)
        self.write()
        return entry

    def write(self, finished: bool = False) -> None:
        if not self.args.out:
            return
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {**describe(self), "finished": finished, "elapsed_s": round(self.elapsed, 1)}
        data["rows"] = self.records
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(out)


def shape_config(config: BagelConfig, size: int) -> BagelConfig:
    """`config` with its edit-input minimum lowered to `size` where it is larger, so that a small --size
    edits at that size too (the official rule enlarges a short side to at least 512 px for the 7B)."""
    limits = config.inference.vae_limits
    if size >= limits.min_size:
        return config
    inference = replace(config.inference, vae_limits=replace(limits, min_size=size))
    return replace(config, inference=inference)


def describe(run: Run) -> dict:
    args = run.args
    if run.device.type == "cuda":
        device = torch.cuda.get_device_name(run.device)
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    return {
        "device": device,
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": str(run.dtype).removeprefix("torch."),
        "size": args.size,
        "edit input min side": run.config.inference.vae_limits.min_size,
        "steps": args.steps,
        "time_limit_s": args.time_limit,
        "peak MiB": "torch.cuda.max_memory_allocated, reset before each record"
        if run.device.type == "cuda"
        else "the process's peak resident set so far (never reset)",
    }


# -- inputs --------------------------------------------------------------------------------------------


def picture(size: int) -> Image.Image:
    """A deterministic test picture: shapes on a gradient (random weights make no picture of their own)."""
    ramp = np.linspace(40, 215, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], size)])
    image = Image.fromarray(pixels.transpose(1, 2, 0).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    s = size / 8
    draw.ellipse((s, s, 3 * s, 3 * s), fill=(220, 30, 30))
    draw.rectangle((3.5 * s, 3.5 * s, 5.5 * s, 5.5 * s), fill=(30, 30, 220))
    return image


# -- one row: a model and every task -------------------------------------------------------------------


def memory_mb(run: Run) -> float:
    return round(_peak_memory_mb(run.device))


def reset_peak(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)


def weights_mb(run: Run, model) -> int:
    if run.device.type == "cuda":
        return round(torch.cuda.memory_allocated(run.device) / 2**20)
    tensors = [*model.parameters(), *model.buffers()]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20)


def free(run: Run) -> None:
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def t2i_settings(steps: int, cfg_img: float | None = None, batched: bool | None = None):
    settings = replace(T2I_SETTINGS, num_steps=steps, batch_cfg=batched)
    return settings if cfg_img is None else replace(settings, cfg_img_scale=cfg_img)


def settings_for(task: str, steps: int, batched: bool | None):
    if task == "t2i":
        return t2i_settings(steps, batched=batched)
    if task == "t2i cfg_img 1.5":
        return t2i_settings(steps, VLLM_OMNI_CFG_IMG, batched)
    return replace(EDIT_SETTINGS, num_steps=steps, batch_cfg=batched)


def run_task(run: Run, model, counter: list[int], task: str, batched: bool | None, steps: int) -> dict:
    """Run one task once; its measurements (seconds, forwards, peak memory, pixels)."""
    size, image = run.args.size, run.source
    reset_peak(run)
    counter[0] = 0
    _sync(run.device)
    start = time.perf_counter()
    if task == "understand":
        first, decoded = [], [0]

        clock = run.clock(start)

        def on_token(step: int, total: int, text: object) -> None:
            if step == 1:
                first.append(time.perf_counter() - start)
            decoded[0] = step
            clock(step, total, text)

        text = TextSettings(max_new_tokens=steps)
        answer, _ = tasks.understand(model, QUESTION, image=image, settings=text, callback=on_token)
        _sync(run.device)
        seconds = time.perf_counter() - start
        tokens = decoded[0]
        out = {"seconds": round(seconds, 3), "tokens": tokens, "stop": answer.stop}
        if first:
            out["first token s"] = round(first[0], 3)
        if tokens > 1 and first:
            out["s/token"] = round((seconds - first[0]) / (tokens - 1), 4)
        return out
    settings = settings_for(task, steps, batched)
    if task == "edit":
        drawn = tasks.edit_images(
            model, [image], EDIT, settings=settings, seed=1, callback=run.clock(start), append_result=False
        )
    else:
        drawn = tasks.generate_images(
            model, PROMPT, height=size, width=size, settings=settings, seed=1, callback=run.clock(start),
            append_result=False,
        )  # fmt: skip
    result = drawn.images[0]
    _sync(run.device)
    seconds = time.perf_counter() - start
    stride = model.config.latent_downsample
    tokens = (result.height // stride) * (result.width // stride)
    return {
        "size": f"{result.width}x{result.height}",
        "seconds": round(seconds, 3),
        "s/step": round(seconds / (steps - 1), 4),
        "batched": batch_cfg(settings, model.device, tokens),
        "pixels": np.asarray(result, dtype=np.int16),
    }


def warm_up(run: Run, model, counter: list[int], batched: bool | None) -> None:
    """On CUDA each task once at the target size with the fewest steps, so that kernels load and tune
    outside the timing. On a CPU only the first row warms up, with a short answer and image: there is
    nothing to tune, and a whole warm-up per row would double the run."""
    cuda = run.device.type == "cuda"
    if not cuda and run.warm:
        return
    for task in TASKS[:2] + TASKS[3:] if cuda else TASKS[:2]:
        run_task(run, model, counter, task, batched, 2)
    run.warm = True


def measure_row(run: Run, row: str, model, batched: bool | None = None, note: str = "") -> None:
    """Every task of `row` on `model`, one record each; a task that fails is recorded and the next runs."""
    counter = counter_of(model)
    attention = resolved_attention(model)
    try:
        warm_up(run, model, counter, batched)
    except TimeLimit:
        run.record(row, "all", status="skipped: time limit reached during warm-up")
        return
    except Exception as e:  # noqa: BLE001 - one broken row must not end the run
        run.record(row, "all", status=f"error in warm-up: {type(e).__name__}: {e}", trace=short_trace())
        return
    extra = {"attention": attention, "weights MiB": weights_mb(run, model)}
    if row == "bf16":
        run.weights_gib = extra["weights MiB"] / 1024
    if note:
        extra["note"] = note
    for task in TASKS:
        expected = run.task_seconds.get(task, 0.0)
        if not run.fits(expected):
            took = f" (it took {expected:.0f} s in an earlier row)" if expected else ""
            run.record(row, task, status=f"skipped: time limit{took}")
            continue
        steps = run.args.tokens if task == "understand" else run.args.steps
        try:
            values = run_task(run, model, counter, task, batched, steps)
        except TimeLimit as stop:
            partial = {"status": f"stopped by the time limit after {stop.done} of {stop.total} steps"}
            if stop.done:
                partial["seconds so far"] = round(stop.seconds, 3)
                partial["s/step so far"] = round(stop.seconds / stop.done, 4)  # the first includes set-up
            run.record(row, task, **partial, **extra)
            continue
        except Exception as e:  # noqa: BLE001
            run.record(row, task, status=f"error: {type(e).__name__}: {e}", trace=short_trace())
            continue
        run.task_seconds[task] = max(expected, values["seconds"])
        values["forwards"] = counter[0]
        values["peak MiB"] = memory_mb(run)
        pixels = values.pop("pixels", None)
        if pixels is not None:
            if row == "bf16":
                run.reference[task] = pixels
            elif task in run.reference and run.reference[task].shape == pixels.shape:
                values["max |Δ| vs bf16"] = int(np.abs(pixels - run.reference[task]).max())
        run.record(row, task, **values, **extra)


def counter_of(model) -> list[int]:
    """The model's decoder-pass counter, its forward wrapped once (rows that share a model share it)."""
    if not hasattr(model.net, "pass_counter"):
        model.net.pass_counter = _count_passes(model)
    return model.net.pass_counter


def resolved_attention(model) -> str:
    backend = model.net.attn_backend
    if backend != "auto":
        return backend
    fast = model.device.type == "cuda" and model.dtype in (torch.float16, torch.bfloat16)
    return "flash" if fast and flash_available() else "sdpa"


def short_trace() -> str:
    return "".join(traceback.format_exc().splitlines(keepends=True)[-6:])


# -- building models -----------------------------------------------------------------------------------


def build(run: Run, row: str, weights: str = "native", attention: str = "auto"):
    """A random model of the preset, or None (recorded) when it cannot be built in the time left."""
    if not run.fits(run.build_seconds):
        run.record(row, "all", status="skipped: time limit (no time left to build the model)")
        return None
    free(run)
    start = time.perf_counter()
    model = random_model(run.config, run.tokenizer_dir, run.device, run.dtype, weights, attention, seed=0)
    _sync(run.device)
    run.build_seconds = max(run.build_seconds, time.perf_counter() - start)
    return model


def guarded(run: Run, row: str, body) -> None:
    """Run one row's body; any error is recorded against the row and the run continues."""
    try:
        body()
    except Exception as e:  # noqa: BLE001
        run.record(row, "all", status=f"error: {type(e).__name__}: {e}", trace=short_trace())
    finally:
        free(run)


def checkpoint_folder(run: Run, model=None) -> Path | None:
    """The bf16 random model (`model`, or one built here) written once as an official-layout folder, for
    the rows that read one (the offload rows load it; the official code builds from it); None (recorded)
    if no time is left to build it."""
    if run.folder is None:
        built = model or build(run, "checkpoint")
        if built is None:
            return None
        start = time.perf_counter()
        save(built.net, built.vae, built.config, run.tokenizer_dir)  # beside the tokenizer: a whole folder
        del built
        run.folder = run.tokenizer_dir
        print(f"wrote the random checkpoint in {time.perf_counter() - start:.1f} s", flush=True)
    return run.folder


def offload_support() -> str:
    """Why `bagel_model.load` cannot load into a GPU budget, or "" when it can (it takes `max_memory`)."""
    params = inspect.signature(bagel_model.load).parameters
    if "max_memory" in params:
        return ""
    if "device_map" in params:
        return "bagel_model.load takes device_map but no max_memory, so no budget can be given"
    return (
        "bagel_model.load takes neither max_memory nor device_map (partial loading / offload, issue #11 "
        "items 1-2, is not implemented)"
    )


def offload_row(run: Run, row: str) -> None:
    """bf16 loaded through `load` with a GPU budget (accelerate's max_memory convention), then every task."""
    reason = offload_support()
    if reason:
        run.record(row, "all", status=f"not available: {reason}")
        return
    if run.device.type != "cuda":
        run.record(row, "all", status="not available: a GPU memory budget needs --device cuda")
        return
    budget = {run.device.index or 0: f"{OFFLOAD_BUDGETS[row]}GiB", "cpu": "100GiB"}
    passes = 1 if run.folder else 2  # write and read, or read only
    # the I/O, then at least an answer and an image (slower offloaded: twice the bf16 time, at the least)
    tasks_seconds = run.task_seconds.get("understand", 0.0) + 2 * run.task_seconds.get("t2i", 0.0)
    expected = passes * run.weights_gib / CHECKPOINT_GIB_PER_S + tasks_seconds
    if not run.fits(expected):
        run.record(row, "all", status=f"skipped: time limit (loading alone needs about {expected:.0f} s)")
        return
    folder = checkpoint_folder(run)
    if folder is None:
        return
    model = bagel_model.load(folder, device=run.device, dtype=run.dtype, max_memory=budget)
    measure_row(run, row, model, note=f"load(max_memory={budget})")


def official_row(run: Run) -> None:
    """The official InterleaveInferencer's text-to-image next to ours on the same weights and initial noise,
    through official_runner (its flash-attn stand-in, its builder, its `infer`): time ratio and pixel Δ.

    On a CPU everything is float32 with official_runner's patches, as in its CPU comparison. On CUDA the
    official code runs as its app does, bf16 weights under its own autocast, with the bf16 casts left in
    (the patches are not applied) and flash_attn_varlen_func served by the runner's exact SDPA stand-in, so
    ours is forced to SDPA too."""
    import official_runner as runner

    # write, read as float32 (twice the bytes) and convert back, plus both images and their warm-ups
    expected = 4 * run.weights_gib / CHECKPOINT_GIB_PER_S + 3 * run.task_seconds.get("t2i", 0.0)
    if not run.fits(expected):
        run.record("official", "t2i", status=f"skipped: time limit (about {expected:.0f} s needed)")
        return
    model = build(run, "official")
    if model is None:
        return
    folder = checkpoint_folder(run, model)
    size, steps = run.args.size, run.args.steps
    cfg = run.config
    noise = torch.randn(  # one image's noise as a batch of one, the same values either way
        1, cfg.latent_channels, size // cfg.vae.downsample, size // cfg.vae.downsample,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    latents = folder / "latents.safetensors"
    save_file({"latents": noise[0]}, str(latents))  # the CLI's --latents file holds one image's
    settings = t2i_settings(steps)
    model.net.attn_backend = "sdpa"
    tasks.generate_images(
        model, PROMPT, height=size, width=size, settings=t2i_settings(2), latents=noise, append_result=False
    )  # warm-up
    _sync(run.device)
    start = time.perf_counter()
    ours = tasks.generate_images(
        model, PROMPT, height=size, width=size, settings=settings, latents=noise, append_result=False
    ).images[0]
    _sync(run.device)
    ours_seconds = time.perf_counter() - start
    del model
    free(run)

    cuda = run.device.type == "cuda"
    patches = {} if cuda else dict(runner.SOURCE_PATCHES)
    with mock.patch.dict(runner.SOURCE_PATCHES, patches, clear=True):
        official = runner.import_official(Path(run.args.official_dir))
    bundle = runner.build_official(folder, official)
    if cuda:
        bundle.model.to(run.device, torch.bfloat16)
        bundle.vae.to(run.device)
    infer = argparse.Namespace(
        task="t2i", prompt=PROMPT, image=None, latents=None, height=size, width=size, steps=2,
        cfg_text=settings.cfg_text_scale, cfg_img=settings.cfg_img_scale, cfg_interval=settings.cfg_interval,
        shift=settings.timestep_shift, renorm_type=settings.renorm_type, renorm_min=settings.renorm_min,
        max_new_tokens=1, do_sample=False, temperature=0.3, seed=0, out=folder / "official_warm_up",
        vae_sample=False,
    )  # fmt: skip
    runner.run_infer(infer, bundle)  # warm-up
    infer.steps, infer.latents, infer.out = steps, latents, folder / "official"
    result = runner.run_infer(infer, bundle)
    theirs = Image.open(infer.out / result["image"]).convert("RGB")
    delta = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    run.record(
        "official",
        f"t2i {size}x{size}",
        **{
            "ours s": round(ours_seconds, 3),
            "official s": round(result["wall_s"], 3),
            "speed-up vs official": round(result["wall_s"] / ours_seconds, 2),
            "max |Δ| vs official": int(delta.max()),
            "mean |Δ| vs official": round(float(delta.mean()), 3),
            "note": "official: "
            + ("bf16 + its autocast, SDPA stand-in for flash-attn" if cuda else "float32, CPU patches")
            + "; ours: sdpa, same noise",
        },
    )


# -- under ComfyUI's memory manager --------------------------------------------------------------------


@dataclass
class Pack:
    """This repository imported as ComfyUI imports a custom-node pack (a package loaded from its folder's
    path), with the ComfyUI tree its bridge runs under: `comfyui` is None, and `why_not` says why, when no
    ComfyUI imports here (the bridge then falls back to plain torch, as outside ComfyUI)."""

    module: ModuleType
    comfyui: Path | None
    why_not: str = ""

    def sub(self, name: str) -> ModuleType:
        """The pack's own module `name` ("nodes.comfy_bridge", "bagel_model.tiny"): its classes, not the
        ones this script imported as `bagel_model`."""
        return importlib.import_module(f"{PACK}.{name}")

    @property
    def managed_by(self) -> str:
        if self.comfyui is None:
            return f"library: Bagel.place(kv_storage=cpu), as the bridge sets it (no ComfyUI: {self.why_not})"
        version = self.comfyui / "comfyui_version.py"
        found = re.search(r'__version__ = "([^"]+)"', version.read_text()) if version.is_file() else None
        release = found[1] if found else "of unknown version"
        return f"ComfyUI {release} ModelPatcher through comfy_bridge.manage ({self.comfyui})"


def import_comfyui(folder: str | None, device: torch.device) -> tuple[Path | None, str]:
    """The ComfyUI tree at `folder` imported (on sys.path, --cpu set for a CPU run, as ComfyUI's own
    `args` say it), or None and why not. A tree that fails to import is taken off the path again with
    what it imported, so the bridge never sees half a ComfyUI."""
    if not folder:
        return None, "give --comfyui DIR, a ComfyUI tree (.ci/run unpacks one at .comfyui-ci/ComfyUI)"
    root = Path(folder).resolve()
    if not (root / "comfy" / "model_patcher.py").is_file():
        return None, f"--comfyui {root} holds no comfy/model_patcher.py: give a ComfyUI tree"
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("comfy.cli_args").args.cpu = device.type == "cpu"
        for name in COMFY_MODULES:
            importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a missing dependency or a torch without the device: say which
        sys.path.remove(str(root))
        for name in [n for n, module in sys.modules.items() if _imported_from(module, root)]:
            del sys.modules[name]
        return None, f"ComfyUI at {root} does not import here: {type(e).__name__}: {e}"
    return root, ""


def _imported_from(module: ModuleType, root: Path) -> bool:
    """Whether `module` was imported from `root` (a namespace package too: no file, search locations)."""
    file, spec = getattr(module, "__file__", None), getattr(module, "__spec__", None)
    places = [file] if file else list(getattr(spec, "submodule_search_locations", None) or [])
    return any(Path(place).is_relative_to(root) for place in places)


def import_pack(run: Run) -> Pack:
    """The pack under the ComfyUI of --comfyui (imported first, so that the bridge finds it), once."""
    if run.pack is None:
        comfyui, why_not = import_comfyui(run.args.comfyui, run.device)
        spec = importlib.util.spec_from_file_location(
            PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
        run.pack = Pack(module, comfyui, why_not)
    return run.pack


def managed_model(run: Run, row: str, pack: Pack):
    """The pack's ManagedModel of the random weights (seed 0, the bf16 row's), built once, or None
    (recorded) when no time is left to build it. Under ComfyUI it is built as the Loader builds a model:
    from `comfy_bridge.layer_ops()`, on the offload device (drawn on the compute device, which is faster,
    then moved), handed to `comfy_bridge.manage`. Without ComfyUI it stays on the device, its contexts'
    K/V kept on the CPU as the bridge would place them."""
    if run.managed is not None:
        return run.managed
    if not run.fits(run.build_seconds):
        run.record(row, "all", status="skipped: time limit (no time left to build the model)")
        return None
    bridge, tiny = pack.sub("nodes.comfy_bridge"), pack.sub("bagel_model.tiny")
    free(run)
    start = time.perf_counter()
    if pack.comfyui is None:
        model = tiny.random_model(run.config, run.tokenizer_dir, run.device, run.dtype, seed=0)
        model.place(run.device, kv_storage=torch.device("cpu"))
        run.managed = bridge.ManagedModel(model)
    else:
        compute, offload = bridge.devices()
        model = tiny.random_model(
            run.config, run.tokenizer_dir, compute, run.dtype, seed=0, ops=bridge.layer_ops()
        )
        model.net.to(offload)
        model.vae.to(offload)
        free(run)
        run.managed = bridge.manage(model, compute, offload)
    _sync(run.device)
    run.build_seconds = max(run.build_seconds, time.perf_counter() - start)
    return run.managed


def comfyui_rows(run: Run, rows: list[str]) -> None:
    """The ComfyUI-managed rows, on one model: a budget changes what ComfyUI loads, not the weights."""
    pack = import_pack(run)
    for row in rows:
        if row == "edit-chain":
            guarded(run, row, lambda: edit_chain_row(run, pack))
        elif run.device.type != "cuda":
            run.record(row, "all", status="not available: a GPU memory budget needs --device cuda")
        elif pack.comfyui is None:
            run.record(row, "all", status=f"not available: {pack.why_not}")
        else:
            guarded(run, row, lambda row=row: budget_row(run, row, pack))
    if pack.comfyui is not None:
        importlib.import_module("comfy.model_management").unload_all_models()
    run.managed = None


def budget_row(run: Run, row: str, pack: Pack) -> None:
    """Text-to-image with ComfyUI's ModelPatcher loading the model into COMFYUI_BUDGETS[row] GiB.

    ComfyUI loads weights into what `get_free_memory` reports less its reserved memory
    (`EXTRA_RESERVED_VRAM`, what --reserve-vram sets) and the inference memory it keeps free; reserving
    all the device has free beyond the budget makes it plan as on a card of that size. Peak memory is the
    image's (reset after the load) and still shows activations and K/V above ComfyUI's plan."""
    mm = importlib.import_module("comfy.model_management")
    lib = pack.sub("bagel_model")
    managed = managed_model(run, row, pack)
    if managed is None:
        return
    expected = run.task_seconds.get("t2i", 0.0) * 2  # at the least: weights cross PCIe every forward
    if not run.fits(expected):
        run.record(row, "t2i", status=f"skipped: time limit (about {expected:.0f} s needed)")
        return
    mm.unload_all_models()
    free(run)
    budget = COMFYUI_BUDGETS[row] * 2**30
    reserved = mm.EXTRA_RESERVED_VRAM
    mm.EXTRA_RESERVED_VRAM = max(0, mm.get_free_memory(run.device) - budget)
    try:
        _sync(run.device)
        start = time.perf_counter()
        model = managed.ready()
        _sync(run.device)
        patcher = managed.patcher
        extra = {
            "load s": round(time.perf_counter() - start, 3),
            "loaded MiB": round(patcher.loaded_size() / 2**20),
            "model MiB": round(patcher.model_size() / 2**20),
            "partly loaded": bool(getattr(model, "model_lowvram", False)),
            "reserved GiB": round(mm.EXTRA_RESERVED_VRAM / 2**30, 1),
            "note": f"{pack.managed_by}, EXTRA_RESERVED_VRAM = free - {COMFYUI_BUDGETS[row]} GiB",
        }
        size, steps = run.args.size, run.args.steps
        settings = replace(lib.T2I_SETTINGS, num_steps=steps)
        lib.generate_images(
            model, PROMPT, height=size, width=size, settings=replace(settings, num_steps=2), seed=1,
            append_result=False,
        )  # warm-up  # fmt: skip
        reset_peak(run)
        start = time.perf_counter()
        try:
            result = lib.generate_images(
                model, PROMPT, height=size, width=size, settings=settings, seed=1, callback=run.clock(start),
                append_result=False,
            ).images[0]  # fmt: skip
        except TimeLimit as stop:
            partial = {"status": f"stopped by the time limit after {stop.done} of {stop.total} steps"}
            if stop.done:
                partial["s/step so far"] = round(stop.seconds / stop.done, 4)
            run.record(row, "t2i", **partial, **extra)
            return
        _sync(run.device)
        seconds = time.perf_counter() - start
        values = {"size": f"{result.width}x{result.height}", "seconds": round(seconds, 3)}
        values |= {"s/step": round(seconds / (steps - 1), 4), "peak MiB": memory_mb(run)}
        pixels, reference = np.asarray(result, dtype=np.int16), run.reference.get("t2i")
        if reference is not None and reference.shape == pixels.shape:
            values["max |Δ| vs bf16"] = int(np.abs(pixels - reference).max())
        run.record(row, "t2i", **values, **extra)
    finally:
        mm.EXTRA_RESERVED_VRAM = reserved


def chain_prompt(pack: Pack, graph: dict, managed, seed: int, steps: int, size: int) -> dict[str, tuple]:
    """One prompt of the API-format `graph` as ComfyUI's executor runs it: each of the pack's nodes called
    on its widget values and its inputs' outputs, in the order of the ids (the example's are
    topological); the Loader's output is `managed` (one load for every prompt, as ComfyUI's cache keeps
    it) and ComfyUI's own nodes (Save Image) are left out: they keep nothing of BAGEL's. Every node gets
    `seed`, so that no prompt repeats another (ComfyUI would answer a repeat from its cache), and at most
    `steps` steps; Text to Image draws `size`² (the edits keep it). Returns each node's outputs."""
    outputs: dict[str, tuple] = {}
    for node_id in sorted(graph, key=int):
        node = graph[node_id]
        if node["class_type"] == "BAGELLoader":
            outputs[node_id] = (managed,)
            continue
        cls = pack.module.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        inputs = {k: outputs[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        inputs |= {"seed": seed, "steps": min(steps, inputs["steps"])}
        if "width" in inputs:
            inputs |= {"width": size, "height": size}
        result = getattr(cls(), cls.FUNCTION)(**inputs)
        outputs[node_id] = result["result"] if isinstance(result, dict) else result
    return outputs


def kept_memory(run: Run, pack: Pack, kept: list[dict[str, tuple]], baseline: int, model) -> dict:
    """What the kept outputs hold: their contexts, the K/V those report to ComfyUI's cache
    (`_comfy_cache_tensors`, shared segments once) and where they are, next to the device's memory."""
    context = pack.sub("bagel_model").Context
    contexts = {
        id(o): o for outputs in kept for result in outputs.values() for o in result if isinstance(o, context)
    }
    tensors = {id(t): t for c in contexts.values() for t in c._comfy_cache_tensors()}.values()
    storage = model.net.kv_storage
    values = {
        "prompts": len(kept),
        "kept contexts": len(contexts),
        "kept K/V MiB": round(sum(t.nbytes for t in tensors) / 2**20, 1),
        "K/V devices": sorted({str(t.device) for t in tensors}),
        "K/V on the offload device": all(t.device == storage for t in tensors),
        # a compact copy each: no view that keeps a task's larger buffer alive unseen by the cache
        "K/V compact": all(t.untyped_storage().nbytes() == t.nbytes for t in tensors),
        "offload device": str(storage),
        "compute device": str(model.device),
    }
    if run.device.type == "cuda":
        _sync(run.device)
        allocated = torch.cuda.memory_allocated(run.device)
        values["allocated MiB"] = round(allocated / 2**20)
        values["growth MiB"] = round((allocated - baseline) / 2**20)  # since the model was loaded
    return values


def edit_chain_row(run: Run, pack: Pack) -> None:
    """The edit-chain example run as CHAIN_PROMPTS[-1] separate prompts, every prompt's outputs kept (an
    output cache that keeps all), recorded after each count of CHAIN_PROMPTS: a context must not pile up
    compute-device memory while a cache holds it (its K/V wait on the offload device)."""
    row = "edit-chain"
    managed = managed_model(run, row, pack)
    if managed is None:
        return
    graph = json.loads(CHAIN.read_text())
    if pack.comfyui is not None:  # a budget row may have left it partly loaded
        importlib.import_module("comfy.model_management").unload_all_models()
        free(run)
    model = managed.ready()  # under ComfyUI: loaded whole (no budget), its K/V storage set by the bridge
    _sync(run.device)
    baseline = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else 0
    kept, longest, start = [], 0.0, time.perf_counter()
    steps = min(run.args.steps, CHAIN_STEPS)
    extra = {"steps": steps, "managed by": pack.managed_by}
    if run.device.type == "cuda":
        extra["weights MiB"] = round(baseline / 2**20)
    for prompt in range(1, CHAIN_PROMPTS[-1] + 1):
        if not run.fits(longest):
            values = kept_memory(run, pack, kept, baseline, model)
            run.record(row, f"{len(kept)} prompts", status="stopped by the time limit", **values, **extra)
            return
        began = time.perf_counter()
        kept.append(chain_prompt(pack, graph, managed, prompt, steps, run.args.size))
        longest = max(longest, time.perf_counter() - began)
        if prompt in CHAIN_PROMPTS:
            values = kept_memory(run, pack, kept, baseline, model)
            values["s/prompt"] = round((time.perf_counter() - start) / prompt, 3)
            run.record(row, f"{prompt} prompts", **values, **extra)


# -- the table -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--preset", default="bagel-7b-mot", choices=sorted(PRESETS))
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50, help="num_timesteps (steps - 1 evaluations)")
    parser.add_argument("--tokens", type=int, default=64, help="answer tokens decoded (greedy)")
    parser.add_argument("--only", help=f"comma list of rows: {', '.join(ROWS)}")
    parser.add_argument("--out", help="results as JSON, rewritten after every record")
    parser.add_argument(
        "--time-limit", type=float, default=420.0, help="seconds from start after which no new work starts"
    )
    parser.add_argument("--official-dir", help="checkout of ByteDance-Seed/Bagel for the official row")
    parser.add_argument(
        "--comfyui",
        default=os.environ.get("COMFYUI_DIR") or default_comfyui(),
        help="ComfyUI tree of the comfyui-* and edit-chain rows ($COMFYUI_DIR, else .comfyui-ci/ComfyUI)",
    )
    args = parser.parse_args(argv)
    rows = ROWS if args.only is None else tuple(r.strip() for r in args.only.split(",") if r.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu)")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bagel_gpu_check_") as tmp:
        tokenizer_dir = Path(tmp)
        config = shape_config(PRESETS[args.preset], args.size)
        write_tokenizer(tokenizer_dir, config.llm.vocab_size)
        run = Run(args, config, device, resolve_dtype(args.dtype, device), tokenizer_dir)
        run.source = picture(args.size)
        print(json.dumps(describe(run)), flush=True)
        run_rows(run, rows)
        run.write(finished=True)
    print()
    print_table(table(run.records))
    return 0


def default_comfyui() -> str | None:
    """The ComfyUI tree .ci/run unpacks beside the repository, where it is."""
    tree = REPO / ".comfyui-ci" / "ComfyUI"
    return str(tree) if tree.is_dir() else None


def run_rows(run: Run, rows: tuple[str, ...]) -> None:
    bf16_rows = [r for r in ("bf16", "cfg-batched", "cfg-unbatched", "sdpa", "flash") if r in rows]
    if bf16_rows:
        guarded(run, bf16_rows[0], lambda: bf16_family(run, bf16_rows))
    for row, weights in (("fp8", "fp8"), ("nf4", "nf4")):
        if row in rows:
            guarded(run, row, lambda row=row, weights=weights: quantized_row(run, row, weights))
    for row in OFFLOAD_BUDGETS:
        if row in rows:
            guarded(run, row, lambda row=row: offload_row(run, row))
    if "official" in rows:
        if run.args.official_dir is None:
            run.record("official", "t2i", status="not available: give --official-dir (a Bagel checkout)")
        else:
            guarded(run, "official", lambda: official_row(run))
    if "lora-train" in rows:
        guarded(run, "lora-train", lambda: lora_row(run))
    comfyui = [r for r in (*COMFYUI_BUDGETS, "edit-chain") if r in rows]
    if comfyui:
        guarded(run, comfyui[0], lambda: comfyui_rows(run, comfyui))


def lora_examples(folder: Path, task: str, size: int) -> None:
    """Two examples of `task` at `size`, in the train-lora folder layout."""
    folder.mkdir(parents=True)
    image = picture(size)
    for i in range(2):
        if task == "t2i":
            image.save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(PROMPT)
        else:
            image.save(folder / f"{i}_src.png")
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"{i}_tgt.png")
            (folder / f"{i}.txt").write_text(EDIT)


def lora_row(run: Run) -> None:
    """LoRA training of the bf16 model (train-lora's defaults: rank 16 on the generation expert, gradient
    checkpointing, one example per step) at --size, text-to-image and edit: steps per second and peak
    memory over LORA_STEPS steps after a warm-up step."""
    model = build(run, "lora-train")
    if model is None:
        return
    for task in ("t2i", "edit"):
        with tempfile.TemporaryDirectory() as scratch:
            lora_examples(Path(scratch) / "data", task, run.args.size)
            examples = read_folder(Path(scratch) / "data", model.config, run.args.size)
            settings = LoraSettings(steps=1 + LORA_STEPS, save_every=10**6)
            times: list[float] = []
            clock = run.clock(time.perf_counter())

            def step(report, clock=clock, times=times) -> None:
                _sync(run.device)
                times.append(time.perf_counter())
                if report.step == 1:
                    reset_peak(run)
                clock(report.step, report.steps, None)

            try:
                train_lora(model, examples, Path(scratch) / "adapter", settings, callback=step)
            except TimeLimit:
                pass
            measured = len(times) - 1
            if measured < 1:
                run.record("lora-train", task, status="skipped: time limit reached in the warm-up step")
                continue
            seconds = times[-1] - times[0]
            run.record(
                "lora-train", task, size=f"{run.args.size}x{run.args.size}", steps=measured,
                **{"s/step": round(seconds / measured, 3), "steps/s": round(measured / seconds, 2),
                   "peak MiB": memory_mb(run), "weights MiB": weights_mb(run, model)},
            )  # fmt: skip


def bf16_family(run: Run, rows: list[str]) -> None:
    """bf16 and its engine variants, on one model: a variant switches a setting, not the weights."""
    model = build(run, rows[0])
    if model is None:
        return
    default_attention = resolved_attention(model)
    size_tokens = (run.args.size // model.config.latent_downsample) ** 2
    default_batched = batch_cfg(T2I_SETTINGS, model.device, size_tokens)
    for row in rows:
        model.net.attn_backend = "auto"
        if row == "bf16":
            guarded_measure(run, row, model)
        elif row in ("cfg-batched", "cfg-unbatched"):
            batched = row == "cfg-batched"
            if batched == default_batched:
                run.record(row, "all", status=f"same as the bf16 row (batch_cfg defaults to {batched} here)")
            else:
                guarded_measure(run, row, model, batched=batched)
        else:
            if row == "flash" and not flash_available():
                run.record(
                    row, "all", status="not available: flash-attn is not importable, or no CUDA device"
                )
            elif row == default_attention:
                run.record(row, "all", status=f"same as the bf16 row (auto attention is {row} here)")
            else:
                model.net.attn_backend = row
                guarded_measure(run, row, model)
    model.net.attn_backend = "auto"


def guarded_measure(run: Run, row: str, model, batched: bool | None = None) -> None:
    try:
        measure_row(run, row, model, batched)
    except Exception as e:  # noqa: BLE001
        run.record(row, "all", status=f"error: {type(e).__name__}: {e}", trace=short_trace())


def quantized_row(run: Run, row: str, weights: str) -> None:
    if weights == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            run.record(row, "all", status=f"not available: bitsandbytes is not importable ({e})")
            return
    model = build(run, row, weights)
    if model is not None:
        measure_row(run, row, model)


COLUMNS = (
    "row", "task", "size", "seconds", "s/step", "first token s", "s/token", "tokens", "forwards", "peak MiB",
    "weights MiB", "batched", "attention", "max |Δ| vs bf16",
)  # fmt: skip


def table(records: list[dict]) -> list[dict]:
    """The records as printed rows, in one column order; tracebacks stay in the JSON."""
    keys = [*COLUMNS, *(k for r in records for k in r if k not in COLUMNS and k != "trace")]
    present = [k for k in dict.fromkeys(keys) if any(k in r for r in records)]
    return [{k: r[k] for k in present if k in r} for r in records]


if __name__ == "__main__":
    sys.exit(main())
