"""`python -m bagel_model`: the library's tasks from a shell, one small function per command.

Every command loads a model folder (default: the bundled model), runs one task and prints a line per
result, or one JSON object with `--json` (`text` for an answer, `thought` for a plan, `image` for a written
file). `understand` and `reason` take `--stream`: the text is printed as it is decoded, before those lines
(to stderr with `--json`, so stdout stays the one JSON object). Errors a user can fix are printed as one
line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from . import tasks
from .checkpoint import DTYPE_CHOICES, load, resolve_dtype
from .model import BagelModel
from .offload import parse_memory
from .quant import WEIGHT_MODES, quiet_int8_cast_warnings
from .reasoning import PROTOCOLS, THINKMORPH, reason
from .sampling import EDIT_SETTINGS, RENORM_TYPES, T2I_SETTINGS, FlowSettings, flow_settings
from .training.finetune import TARGET_CHOICES, LoraSettings


@dataclass
class Output:
    """What a command produced, printed as lines or as one JSON object."""

    values: dict

    def emit(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps(self.values))
        else:
            for key, value in self.values.items():
                print(f"{key}: {value}")


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path} cannot be read as an image ({e})") from None


def _read_latents(path: str | None) -> torch.Tensor | None:
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ValueError(f"--latents {path} is not a readable safetensors file ({e})") from None
    if "latents" not in tensors:
        raise ValueError(f"--latents {path} holds {sorted(tensors)}, not a tensor named 'latents'")
    return tensors["latents"].unsqueeze(0)  # the file holds one image's latents; the tasks take a batch


def _model(args: argparse.Namespace) -> BagelModel:
    from .bundled import default_model_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    try:
        return load(
            args.model or default_model_dir(),
            loras=args.lora,
            device=device,
            dtype=dtype,
            weights=args.weights,
            vae=args.vae,
            tokenizer=args.tokenizer,
            device_map=args.device_map,
            max_memory=parse_memory(args.max_memory) if args.max_memory else None,
            offload_folder=args.offload_folder,
        )
    except ImportError as e:  # an optional package (bitsandbytes), the user's to install: one line
        raise ValueError(str(e)) from None


def lora_option(value: str) -> tuple[str, float]:
    """`--lora PATH[:STRENGTH]` as (path, strength); strength 1 when the text after the last colon is not
    a number (a path may hold colons)."""
    path, _, strength = value.rpartition(":")
    try:
        return (path, float(strength)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def _flow_settings(args: argparse.Namespace, base: FlowSettings) -> FlowSettings:
    """`base` with the sampler options given on the command line (an option left out keeps its value)."""
    start, end = args.cfg_interval or (None, None)
    return flow_settings(
        base,
        steps=args.steps,
        cfg_text_scale=args.cfg_text,
        cfg_img_scale=args.cfg_img,
        cfg_interval_start=start,
        cfg_interval_end=end,
        timestep_shift=args.timestep_shift,
        renorm_type=args.renorm_type,
        renorm_min=args.renorm_min,
        step_cache=args.step_cache,
    )


def _progress(args: argparse.Namespace) -> Callable | None:
    if args.json or not sys.stderr.isatty():
        return None

    def show(step: int, total: int, _payload) -> None:
        print(f"\r{step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    return show


class Stream:
    """`--stream`: a task's callback that prints its text as it grows (the text so far comes with each
    decoded token), the new part only. Where the text changed behind what was printed (Reason's
    `[drawing image k]` marker becoming `[image k]`), the changed line is printed again on a new line, so
    the output only ever grows and reads right in a pipe."""

    def __init__(self, out: TextIO):
        self._out = out
        self._shown = ""

    def __call__(self, _step: int, _total: int, payload: object) -> None:
        if isinstance(payload, str):
            self._show(payload)

    def finish(self, text: str) -> None:
        """The final text: what is not shown yet, then the end of the line."""
        self._show(text)
        print(file=self._out, flush=True)

    def _show(self, text: str) -> None:
        if text.startswith(self._shown):
            new = text[len(self._shown) :]
        else:
            same = len(os.path.commonprefix([self._shown, text]))
            line = text.rfind("\n", 0, same) + 1  # the changed line starts here
            new = "\n" + text[line:]
        print(new, end="", file=self._out, flush=True)
        self._shown = text


def _stream(args: argparse.Namespace) -> Stream | None:
    if not args.stream:
        return None
    return Stream(sys.stderr if args.json else sys.stdout)


def _save(image: Image.Image, out: str) -> str:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def cmd_understand(args: argparse.Namespace) -> Output:
    image = _open_image(args.image) if args.image else None
    model = _model(args)
    settings = tasks.TextSettings(max_new_tokens=args.max_new_tokens)
    stream = _stream(args)
    answer, _ = tasks.understand(
        model, args.prompt, image=image, think=args.think, settings=settings, seed=args.seed, callback=stream
    )
    if stream is not None:
        stream.finish(answer)
    # stop: "end", "max_new_tokens", or "window" (cut where the model's position window ends)
    return Output({"text": answer, "stop": answer.stop})


def _maybe_think(args, model, image=None):
    """With --think: plan first, and return (thought, context holding the plan)."""
    if not args.think:
        return None, None
    settings = tasks.TextSettings(max_new_tokens=args.max_think_tokens)
    return tasks.think(model, args.prompt, image=image, settings=settings, seed=args.seed)


def _image_knobs(args: argparse.Namespace, base: FlowSettings) -> dict:
    """Keyword arguments shared by generate and edit: size, sampler settings, seed, noise, progress."""
    return dict(
        height=args.height,
        width=args.width,
        settings=_flow_settings(args, base),
        seed=args.seed,
        latents=_read_latents(args.latents),
        callback=_progress(args),
    )


def _image_output(args: argparse.Namespace, image: Image.Image, thought: str | None, start: float) -> Output:
    values = {"image": _save(image, args.out), "seconds": round(time.perf_counter() - start, 3)}
    if thought is not None:
        values["thought"] = thought
    return Output(values)


def cmd_generate(args: argparse.Namespace) -> Output:
    knobs = _image_knobs(args, T2I_SETTINGS)
    model = _model(args)
    start = time.perf_counter()
    thought, ctx = _maybe_think(args, model)
    prompt = None if ctx else args.prompt
    image = tasks.generate_images(model, prompt, context=ctx, append_result=False, **knobs).images[0]
    return _image_output(args, image, thought, start)


def cmd_edit(args: argparse.Namespace) -> Output:
    source = _open_image(args.image)
    knobs = _image_knobs(args, EDIT_SETTINGS)
    model = _model(args)
    start = time.perf_counter()
    thought, ctx = _maybe_think(args, model, image=source)
    if ctx is None:
        out = tasks.edit_images(model, [source], args.prompt, append_result=False, **knobs)
    else:  # the plan's context already holds the image and the instruction
        out = tasks.edit_images(model, None, None, context=ctx, append_result=False, **knobs)
    return _image_output(args, out.images[0], thought, start)


def _frame_prompts(prompts: list[str], frames: int | None) -> list[str]:
    if frames is None:
        return prompts
    if len(prompts) != 1:
        raise ValueError(f"--frames repeats one --prompt; got {len(prompts)} prompts (drop --frames)")
    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")
    return prompts * frames


def _save_all(images: list[Image.Image], folder: str, stem: str) -> list[str]:
    return [_save(image, str(Path(folder) / f"{stem}_{k:03d}.png")) for k, image in enumerate(images)]


def cmd_sequence(args: argparse.Namespace) -> Output:
    image = _open_image(args.image) if args.image else None
    prompts = _frame_prompts(args.prompt, args.frames)
    settings = _flow_settings(args, EDIT_SETTINGS)
    model = _model(args)
    (frames,), _ = tasks.generate_sequences(
        model, prompts, image=image, height=args.height, width=args.width, settings=settings, seed=args.seed,
        callback=_progress(args),
    )  # fmt: skip
    return Output({"images": _save_all(frames, args.out_dir, "frame")})


def cmd_reason(args: argparse.Namespace) -> Output:
    image = _open_image(args.image) if args.image else None
    protocol = PROTOCOLS[args.mode]
    text = (
        protocol.text
        if args.max_new_tokens is None
        else replace(protocol.text, max_new_tokens=args.max_new_tokens)
    )
    settings = _flow_settings(args, EDIT_SETTINGS)
    model = _model(args)
    stream = _stream(args)
    out = reason(
        model, args.prompt, image=image, protocol=protocol, max_rounds=args.max_rounds, text_settings=text,
        flow_settings=settings, seed=args.seed, callback=stream or _progress(args),
    )  # fmt: skip
    if stream is not None:
        stream.finish(out.transcript)
    values = {"answer": out.answer, "stop": out.stop, "transcript": out.transcript}
    return Output({**values, "images": _save_all(out.images, args.out_dir, "image")})


def contact_sheet(items: list[tuple[str, Image.Image]], cell: int = 160) -> Image.Image:
    """A one-row sheet of labelled thumbnails."""
    label_h = 28
    sheet = Image.new("RGB", (cell * len(items), cell + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(items):
        thumb = image.convert("RGB").resize((cell - 8, cell - 8), Image.NEAREST)
        sheet.paste(thumb, (i * cell + 4, 4))
        draw.text((i * cell + 4, cell + 4), label[:26], fill="black")
    return sheet


DEMO_MOVES = ["move right", "move down"]


def cmd_demo(args: argparse.Namespace) -> Output:
    """Every task once on the model, images and answers under --out, plus a contact sheet."""
    model = _model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = dict(height=model.config.inference.default_height, width=model.config.inference.default_width)
    steps = flow_settings(T2I_SETTINGS, steps=args.steps or 20)
    edit_steps = flow_settings(EDIT_SETTINGS, steps=args.steps or 20)
    prompt = "a red circle at the top left, a blue square at the center"
    t0 = time.perf_counter()
    t2i = tasks.generate_images(model, prompt, settings=steps, seed=args.seed, **size).images[0]
    answer, _ = tasks.understand(
        model,
        "describe the image.",
        image=t2i,
        settings=tasks.TextSettings(max_new_tokens=64),
        seed=args.seed,
    )
    thought, plan = tasks.think(
        model, "draw a shape with three corners in the color of the sky at the center"
    )
    drawn = tasks.generate_images(model, None, context=plan, settings=steps, seed=args.seed, **size)
    planned = drawn.images[0]
    edited = tasks.edit_images(
        model, [t2i], "make the circle green", settings=edit_steps, seed=args.seed
    ).images[0]
    (frames,), _ = tasks.generate_sequences(
        model, ["the red circle moves right"] * 2, image=t2i, settings=edit_steps, seed=args.seed
    )
    (views,), _ = tasks.generate_sequences(model, DEMO_MOVES, image=t2i, settings=edit_steps, seed=args.seed)
    items = [("t2i", t2i), ("think->t2i", planned), ("edit", edited)]
    items += [(f"frame {k + 1}", f) for k, f in enumerate(frames)]
    items += [(move, view) for move, view in zip(DEMO_MOVES, views, strict=True)]
    files = {}
    for label, image in items:
        name = label.replace(" ", "_").replace("->", "_") + ".png"
        files[label] = _save(image, out / name)
    contact_sheet(items).save(out / "contact_sheet.png")
    (out / "answers.json").write_text(json.dumps({"understand": answer, "think": thought}, indent=2))
    return Output(
        {
            "text": answer,
            "thought": thought,
            "images": files,
            "contact_sheet": str(out / "contact_sheet.png"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )


def cmd_bench_shapes(args: argparse.Namespace) -> Output:
    """The capability table of a shapes-world model on held-out scenes, printed and written as JSON."""
    from .training.evaluate import CAPABILITIES, TABLE, evaluate

    model = _model(args)
    wanted = tuple(c for c in CAPABILITIES if args.think or c != "think")
    log = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    report = evaluate(
        model, n=args.n, seed=args.eval_seed, capabilities=wanted, log=log, num_steps=args.steps
    )
    rows = []
    for name, score in report.items():
        label, metric, target = TABLE[name]
        rows.append({"capability": label, "metric": metric, "score": round(score, 3), "target": target,
                     "met": None if target is None else score >= target})  # fmt: skip
    table = {"model": str(model.source), "n": args.n, "steps": args.steps or 50, "rows": rows}
    Path(args.out).write_text(json.dumps(table, indent=2))
    if not args.json:
        print(f"{'capability':<40} {'score':>6} {'target':>7}")
        for row in rows:
            target = "report" if row["target"] is None else f">= {row['target']:.2f}"
            print(f"{row['capability']:<40} {row['score']:>6.3f} {target:>7}")
    return Output({"table": args.out} if not args.json else table)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _training_progress(args: argparse.Namespace, steps: int) -> Callable:
    """A progress bar on stderr: step, loss (mean of the last 10 steps) and time left; redrawn in place on
    a terminal, else a line every twentieth of the run. Nothing with --json."""
    tty, every = sys.stderr.isatty(), max(1, steps // 20)
    losses: list[float] = []

    def show(report) -> None:
        losses.append(report.loss)
        if args.json or not (tty or report.step % every == 0 or report.step == steps):
            return
        done = report.step / report.steps
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        loss = sum(losses[-10:]) / len(losses[-10:])
        line = f"[{bar}] {report.step}/{report.steps} loss {loss:.4f} {_minutes(report.seconds_left)} left"
        end = "\n" if not tty or report.step == report.steps else ""
        print(f"\r{line}" if tty else line, end=end, file=sys.stderr, flush=True)

    return show


def cmd_train_lora(args: argparse.Namespace) -> Output:
    """Train a LoRA adapter on a data folder; Ctrl-C stops the run and keeps what was trained."""
    from .training.finetune import LoraSettings, train_lora
    from .training.folder import read_folder

    settings = LoraSettings(
        steps=args.steps, lr=args.lr, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, targets=args.targets, batch=args.batch, accumulate=args.accumulate,
        resolution=args.resolution, seed=args.seed, timestep_shift=args.timestep_shift,
        gradient_checkpointing=not args.no_checkpointing, save_every=args.save_every,
    )  # fmt: skip
    model = _model(args)
    examples = read_folder(args.data, model.config, settings.resolution)  # every bad file, before training
    if not args.json:
        kinds = ", ".join(f"{n} {kind}" for kind, n in examples.counts.items())
        print(f"{len(examples.plans)} examples ({kinds}) from {args.data}", file=sys.stderr, flush=True)
    resume = None if args.resume is None else (args.resume or args.out)
    start = time.monotonic()
    try:
        result = train_lora(
            model, examples, args.out, settings, resume=resume, callback=_training_progress(args, args.steps)
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the adapter trained so far is saved in {args.out}; continue it with --resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    last = result.history[-1]["loss"] if result.history else None
    return Output({"adapter": str(result.adapter), "steps": result.steps, "loss": last,
                   "seconds": round(time.monotonic() - start, 1)})  # fmt: skip


def cmd_make_tiny(args: argparse.Namespace) -> Output:
    from .config import PRESETS
    from .tiny import make_tiny

    return Output({"model": str(make_tiny(args.dir, seed=args.seed, cfg=PRESETS[args.preset]))})


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="model folder (official layout, or a fine-tune's) or single-file .safetensors (default: the "
        "bundled model)",
    )
    p.add_argument("--vae", help="FLUX's ae.safetensors: needed by a single file (default: the folder's)")
    p.add_argument(
        "--tokenizer", help="folder of the Qwen2.5 tokenizer: needed by a single file (default: the folder's)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument(
        "--device-map",
        help="spread the decoder with accelerate: auto, balanced, balanced_low_0, sequential (auto with "
        "--max-memory)",
    )
    p.add_argument(
        "--max-memory",
        action="append",
        metavar="DEVICE=SIZE",
        help="memory budget per device for the device map, e.g. cuda:0=20GiB, cpu=64GiB (repeatable)",
    )
    p.add_argument("--offload-folder", help="where weights that fit no budget are offloaded (disk)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (auto: bf16 on GPU)")
    p.add_argument(
        "--weights",
        default="native",
        choices=WEIGHT_MODES,
        help="decoder weight storage: fp8 (float8), nf4 / int8 (bitsandbytes, when installed)",
    )
    p.add_argument(
        "--lora",
        type=lora_option,
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="merge a LoRA adapter (PEFT folder or its adapter_model.safetensors) at STRENGTH (default 1); "
        "repeatable, merged in order; needs --weights native",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _stream_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--stream",
        action="store_true",
        help=f"print {what} as it is decoded, before the result lines (to stderr with --json)",
    )


def _flow_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output image file (.png)")
    _sampler_options(p)
    p.add_argument(
        "--latents", help="safetensors file with one tensor 'latents' [16, H/8, W/8] (overrides seed)"
    )
    p.add_argument("--think", action="store_true", help="write a plan first and generate from it")
    p.add_argument("--max-think-tokens", type=int, default=tasks.THINK_TEXT_SETTINGS.max_new_tokens)


def _sampler_options(p: argparse.ArgumentParser) -> None:
    """Size and sampler knobs (unset: the task's official defaults)."""
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg-text", type=float)
    p.add_argument("--cfg-img", type=float)
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("START", "END"))
    p.add_argument("--timestep-shift", type=float)
    p.add_argument("--renorm-type", choices=RENORM_TYPES)
    p.add_argument("--renorm-min", type=float)
    p.add_argument("--step-cache", type=int, default=1, help="k > 1: run the network every k-th step only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bagel_model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("understand", help="answer a question about an image")
    _common(p)
    p.add_argument("--image")
    p.add_argument("--prompt", required=True)
    p.add_argument("--think", action="store_true", help="reason before answering")
    p.add_argument("--max-new-tokens", type=int, default=tasks.TextSettings().max_new_tokens)
    _stream_option(p, "the answer")
    p.set_defaults(run=cmd_understand)

    p = sub.add_parser("generate", help="text to image")
    _common(p)
    p.add_argument("--prompt", required=True)
    _flow_options(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("edit", help="edit an image by an instruction")
    _common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    _flow_options(p)
    p.set_defaults(run=cmd_edit)

    p = sub.add_parser("sequence", help="an image sequence: multi-frame motion, world navigation")
    _common(p)
    p.add_argument("--image", help="the first frame (optional)")
    p.add_argument("--prompt", required=True, action="append", help="one per frame, or one with --frames")
    p.add_argument("--frames", type=int, help="repeat a single --prompt this many times")
    p.add_argument("--out-dir", required=True, help="folder for frame_000.png, frame_001.png, ...")
    _sampler_options(p)
    p.set_defaults(run=cmd_sequence)

    p = sub.add_parser("reason", help="visual chain-of-thought: reason in text and drawn images")
    _common(p)
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--image")
    p.add_argument(
        "--mode", default=THINKMORPH.name, choices=list(PROTOCOLS), help="the fine-tune's protocol"
    )
    p.add_argument("--max-rounds", type=int, help="images drawn at most (default: the protocol's)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per text segment (default: the protocol's)")
    p.add_argument("--out-dir", required=True, help="folder for the drawn images")
    _sampler_options(p)
    _stream_option(p, "the transcript, with a line where a picture is being drawn,")
    p.set_defaults(run=cmd_reason)

    p = sub.add_parser("demo", help="run every task once and write a contact sheet")
    _common(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, help="denoising steps (default 20)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("bench-shapes", help="the capability table of a shapes-world model")
    _common(p)
    p.add_argument(
        "--think", action="store_true", help="also the thinking row (indirect prompts with a plan)"
    )
    p.add_argument("--n", type=int, default=50, help="held-out cases per capability")
    p.add_argument("--steps", type=int, help="sampler steps (default: the official 50)")
    p.add_argument(
        "--eval-seed", type=int, default=10_000, help="held-out scene seed (never used in training)"
    )
    p.add_argument("--out", default="bench_shapes.json", help="where to write the table as JSON")
    p.set_defaults(run=cmd_bench_shapes)

    p = sub.add_parser("train-lora", help="train a LoRA adapter on a folder of examples")
    _common(p)
    p.add_argument(
        "--data",
        required=True,
        help="folder of examples: name.png + name.txt (caption), name_src.png + name_tgt.png + name.txt "
        "(edit), name.png + name.qa.json (questions)",
    )
    p.add_argument("--out", required=True, help="adapter folder (PEFT: adapter_config.json + safetensors)")
    p.add_argument("--steps", type=int, default=LoraSettings.steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=LoraSettings.lr, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=LoraSettings.rank)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--dropout", type=float, default=LoraSettings.dropout)
    p.add_argument(
        "--targets",
        default=LoraSettings.targets,
        choices=TARGET_CHOICES,
        help="experts adapted: gen (images), und (text), all; auto: gen, plus und when there are questions",
    )
    p.add_argument("--batch", type=int, default=LoraSettings.batch, help="examples per micro-step")
    p.add_argument("--accumulate", type=int, default=LoraSettings.accumulate, help="micro-steps per step")
    p.add_argument(
        "--resolution",
        type=int,
        default=LoraSettings.resolution,
        help="longest image side (capped by the model)",
    )
    p.add_argument("--timestep-shift", type=float, default=LoraSettings.timestep_shift)
    p.add_argument("--save-every", type=int, default=LoraSettings.save_every, help="steps between saves")
    p.add_argument(
        "--no-checkpointing", action="store_true", help="keep every layer's activations (faster, more memory)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="DIR",
        help="continue the run saved in DIR (default: --out), or start from an adapter there",
    )
    p.set_defaults(run=cmd_train_lora)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", choices=["tiny", "mid"], help="mid: a benchmark-sized model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "weights", None) == "int8":
        quiet_int8_cast_warnings()  # a process-wide logging setting: the application's to make
    try:
        output = args.run(args)
    except (
        ValueError
    ) as e:  # CheckpointError, ContextError, TokenizerError and bad values: fixable by the user
        print(f"error: {e}", file=sys.stderr)
        return 2
    output.emit(args.json)
    return 0
